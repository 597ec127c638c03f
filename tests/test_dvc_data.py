"""The real ``dvc repro filelist`` in a fresh clone: Glyph-FS and its three filelists, then a
second run that does nothing."""

from __future__ import annotations

import csv
import json

from conftest import GLYPHS_CLASSES, TINY_IMAGES_PER_CLASS, git, make_dvc_repo, run_dvc


def test_dvc_repro_filelist_builds_glyphs_then_does_nothing(tmp_path):
    repo = make_dvc_repo(tmp_path / "clone", {"glyphs.images_per_class": TINY_IMAGES_PER_CLASS})

    first = run_dvc(repo, "repro", "filelist", check=True)
    assert "Running stage 'prepare'" in first.stdout
    assert "Running stage 'filelist'" in first.stdout
    assert "Running stage 'pretrain'" not in first.stdout  # only up to the target

    data = repo / "data" / "glyphs"
    for split, n_classes in GLYPHS_CLASSES.items():
        with (data / "split" / f"{split}.csv").open(newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["filename", "label"]
        labels = [label for _, label in rows[1:]]
        assert len(set(labels)) == n_classes, split
        assert len(labels) == n_classes * TINY_IMAGES_PER_CLASS, split
        assert all((data / name).is_file() for name, _ in rows[1:])
        assert len(list((data / split).iterdir())) == n_classes
    counts = json.loads((repo / "results" / "data" / "glyphs.json").read_text())
    assert {s: c["classes"] for s, c in counts.items()} == GLYPHS_CLASSES

    lock = (repo / "dvc.lock").read_text()
    assert "prepare:" in lock and "filelist:" in lock
    assert "images_per_class: 20" in lock

    second = run_dvc(repo, "repro", "filelist", check=True)
    assert "Running stage" not in second.stdout
    assert "didn't change" in second.stdout or "up to date" in second.stdout

    status = run_dvc(repo, "status", "filelist", check=True)
    assert "up to date" in status.stdout, status.stdout
    assert "changed" not in status.stdout

    # Outputs are DVC's, not git's: git sees only the lock file and the .gitignore entries.
    tracked = git(repo, "status", "--porcelain", "--untracked-files=all").stdout
    assert "data/glyphs/meta_train/" not in tracked
    assert "data/glyphs/split/" not in tracked
    assert "dvc.lock" in tracked
