"""The README's "Datasets" flow, typed as documented, for every real dataset and the MH recipe.

Each flow makes a fresh clone (git + DVC), writes a tiny stand-in of the dataset in its real
on-disk format, copies it under ``data/raw/``, and runs the documented commands with the real
``dvc`` CLI: ``dvc add``, the commit of the ``.dvc`` file, ``dvc exp run -S dataset=<name>``
through ``metatest`` (tiny-run params from ``conftest.CLONE_TINY``, MLflow off). A fast test
checks that ``README.md`` and ``data/raw/README.md`` spell exactly the commands the flows run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import CLONE_TINY, REPO, git, make_dvc_repo, run
from standins import cifar_parts, write_cifar_archive, write_cub, write_flowers, write_seed_folder

COMMIT = 'git add data/raw/*.dvc && git commit -m "Track the raw data"'
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: one thread is many times faster on a shared CPU
TINY = {**CLONE_TINY, "tracking": False}  # MLflow is tested elsewhere; here it would only cost time


def build_flowers(folder: Path) -> None:
    """``folder`` = .../flower: 6 images of each of the 102 classes, in a shuffled order."""
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(1, 103), 6)).astype(np.uint8)
    write_flowers(folder.parent, labels)


@dataclass(frozen=True)
class Flow:
    """One row of the README's table: what the user puts at data/raw/<raw>, and its dataset."""

    dataset: str
    raw: str
    build: Callable[[Path], None]
    classes: tuple[int, int, int]  # meta_train, meta_val, meta_test classes of the stand-in

    @property
    def track(self) -> str:
        return f"dvc add data/raw/{self.raw}"

    @property
    def run(self) -> str:
        return f"dvc exp run -S dataset={self.dataset}"


FLOWS = {
    "cifar100-archive": Flow("cifar100", "cifar-100-python.tar.gz",
                             lambda p: write_cifar_archive(p, *cifar_parts(per_part=3)), (64, 16, 20)),
    "cifar100-folder": Flow("cifar100", "cifar100", lambda p: write_seed_folder(p, ".png"), (5, 5, 5)),
    "miniimagenet": Flow("miniimagenet", "miniimagenet", lambda p: write_seed_folder(p, ".jpg"), (5, 5, 5)),
    "cub": Flow("cub", "CUB_200_2011", write_cub, (10, 5, 5)),
    "flower": Flow("flower", "flower", build_flowers, (71, 15, 16)),
    "folder": Flow("folder", "folder", lambda p: write_seed_folder(p, ".png"), (5, 5, 5)),
}


def shell(repo: Path, command: str) -> str:
    """Run one documented command line as typed (bash: globs, quotes, &&); returns stdout."""
    return run(["bash", "-c", command], cwd=repo, env=ONE_THREAD, check=True).stdout


def bring(repo: Path, flow: Flow, downloads: Path) -> None:
    """The user's part: put the stand-in under data/raw/, track it, commit the .dvc file."""
    stand_in = downloads / flow.raw
    flow.build(stand_in)
    shell(repo, f"cp -r {stand_in} data/raw/")
    shell(repo, flow.track)
    shell(repo, COMMIT)


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def mh_commands() -> list[str]:
    """The lines of the README's bash block that sets up the MH scenario."""
    blocks = re.findall(r"```bash\n(.*?)```", readme_section("Datasets"), flags=re.S)
    block = next(b for b in blocks if "pool_datasets" in b)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_readmes_spell_the_commands_the_flows_run():
    datasets = readme_section("Datasets")
    raw_readme = (REPO / "data" / "raw" / "README.md").read_text()
    for flow in FLOWS.values():
        for command in (flow.track, flow.run):
            assert f"`{command}`" in datasets, command
            assert f"`{command}`" in raw_readme, command
    assert COMMIT in datasets and f"`{COMMIT}`" in raw_readme
    assert any("purer prepare --dataset cub" in line for line in mh_commands())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FLOWS))
def test_documented_flow_runs_the_pipeline_on_the_dataset(tmp_path, name):
    flow = FLOWS[name]
    repo = make_dvc_repo(tmp_path / "repo", TINY)
    bring(repo, flow, tmp_path / "downloads")

    out = shell(repo, flow.run)

    for stage in ("prepare", "filelist", "pretrain", "metatrain", "metatest"):
        assert f"Running stage '{stage}'" in out, out
    counts = json.loads((repo / "results" / "data" / f"{flow.dataset}.json").read_text())
    assert tuple(counts[s]["classes"] for s in ("meta_train", "meta_val", "meta_test")) == flow.classes
    metrics = json.loads((repo / "results" / "metatest" / "details.json").read_text())
    assert metrics["episodes"] == CLONE_TINY["episode_test"] and 0 <= metrics["accuracy"] <= 100
    if flow.dataset == "folder":  # its normalisation, computed from the meta-train images, goes with the data
        record = json.loads((repo / "data" / "folder" / "split" / "normalisation.json").read_text())
        assert record["image_size"] == 32 and record["computed"] == ["mean", "std"]
        assert all(0 <= m <= 1 for m in record["mean"]) and all(s > 0 for s in record["std"])
        pool = json.loads((repo / "models" / "teachers" / "pool.json").read_text())
        assert all(t["mean"] == record["mean"] and t["std"] == record["std"] for t in pool["teachers"])
    # The raw data is still in place (DVC saw its .dvc file, so did not delete it as an unknown
    # link) and out of git; the .dvc file is in git.
    assert (repo / "data" / "raw" / flow.raw).exists()
    assert sorted(git(repo, "ls-files", "data/raw").stdout.split()) == sorted(
        ["data/raw/README.md", f"data/raw/{flow.raw}.dvc"])


@pytest.mark.slow
def test_documented_mh_recipe_trains_teachers_of_three_datasets(tmp_path):
    repo = make_dvc_repo(tmp_path / "repo", {**TINY, "APInum": 3})  # one teacher per dataset
    for name in ("cifar100-folder", "miniimagenet", "cub"):
        bring(repo, FLOWS[name], tmp_path / "downloads")

    outputs = [shell(repo, command) for command in mh_commands()]

    assert "Running stage 'metatest'" in outputs[-1], outputs[-1]
    pretrain = json.loads((repo / "results" / "pretrain" / "details.json").read_text())
    assert {d: s["teachers"] for d, s in pretrain["by_dataset"].items()} == {
        "cifar100": 1, "miniimagenet": 1, "cub": 1}
    pool = json.loads((repo / "models" / "teachers" / "pool.json").read_text())
    assert sorted((t["dataset"], t["image_size"]) for t in pool["teachers"]) == [
        ("cifar100", 32), ("cub", 84), ("miniimagenet", 84)]
    assert json.loads((repo / "results" / "metatest" / "metrics.json").read_text())["test_acc"] >= 0
