"""Tests for the Glyph-FS generator: layout, determinism, difficulty and look-alike pruning."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from purer_mlops.data import glyphs
from purer_mlops.errors import UserError

CLASS_NAME = re.compile(r"^u[0-9a-f]{4,6}-[a-z0-9]+(-[a-z0-9]+)*$")


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Map every file under ``root`` (relative path) to its content."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def glyphfs(tmp_path_factory) -> tuple[Path, dict]:
    """One generation with 40 images per class, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("glyphfs") / "glyphs"
    summary = glyphs.generate(root, seed=0, images_per_class=40, progress=False)
    return root, summary


def test_split_sizes_disjoint_classes_and_names(glyphfs):
    root, summary = glyphfs
    assert summary["classes"] == {"meta_train": 64, "meta_val": 16, "meta_test": 20}
    assert summary["images_per_class"] == 40
    assert sorted(p.name for p in root.iterdir()) == ["meta_test", "meta_train", "meta_val"]
    seen: set[str] = set()
    for split, size in summary["classes"].items():
        classes = sorted(p.name for p in (root / split).iterdir())
        assert len(classes) == size
        assert all(CLASS_NAME.match(c) for c in classes), classes
        assert seen.isdisjoint(classes)
        seen.update(classes)
        for c in classes:
            files = sorted(p.name for p in (root / split / c).iterdir())
            assert files == [f"{i:04d}.png" for i in range(40)]
    assert "u0041-latin-capital-letter-a" == glyphs.class_name(0x41)


def test_images_are_32px_rgb_png_without_metadata(glyphfs):
    root, _ = glyphfs
    files = sorted((root / "meta_test").rglob("*.png"))
    assert len(files) == 20 * 40
    for f in files:
        with Image.open(f) as img:
            assert img.format == "PNG"
            assert img.mode == "RGB"
            assert img.size == (32, 32)
            assert not img.text  # no tEXt/iTXt chunks (timestamps, software)
    # Images of one class really vary (colours, pose, noise).
    first = [np.asarray(Image.open(f), dtype=np.float32) for f in files[:10]]
    assert min(np.abs(a - b).mean() for a, b in zip(first, first[1:], strict=False)) > 5.0


def test_same_seed_same_bytes_across_processes_and_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    summary = glyphs.generate(a, seed=7, images_per_class=4, progress=False)
    # A fresh interpreter: no shared caches, different hash seed.
    code = (
        "from pathlib import Path; from purer_mlops.data import glyphs; "
        f"glyphs.generate(Path({str(b)!r}), seed=7, images_per_class=4, progress=False)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    glyphs.generate(c, seed=8, images_per_class=4, progress=False)

    tree_a, tree_b, tree_c = _tree_bytes(a), _tree_bytes(b), _tree_bytes(c)
    assert len(tree_a) == sum(summary["classes"].values()) * 4
    assert tree_a == tree_b
    assert tree_a.keys() != tree_c.keys()  # another seed picks other classes...
    common = tree_a.keys() & tree_c.keys()
    assert common
    assert all(tree_a[k] != tree_c[k] for k in common)  # ...and draws other images


def test_worker_count_does_not_change_the_bytes(tmp_path):
    one = glyphs.generate(tmp_path / "one", seed=3, images_per_class=3, progress=False, workers=1)
    three = glyphs.generate(tmp_path / "three", seed=3, images_per_class=3, progress=False, workers=3)
    assert one == three
    tree = _tree_bytes(tmp_path / "one")
    assert len(tree) == 100 * 3 and tree == _tree_bytes(tmp_path / "three")


def test_render_does_not_depend_on_order():
    # Each image has its own random stream, so rendering order cannot matter.
    forward = [glyphs.render(0x52, 3, i) for i in range(3)]
    backward = [glyphs.render(0x52, 3, i) for i in reversed(range(3))][::-1]
    assert all(np.array_equal(f, b) for f, b in zip(forward, backward, strict=True))


def test_pixel_nearest_neighbour_is_near_chance(glyphfs):
    root, _ = glyphfs
    acc = glyphs.nearest_neighbour_accuracy(root, "meta_test", way=5, shot=1, query=15)
    assert 0.0 < acc <= 0.35


def test_nearest_neighbour_solves_an_easy_task(tmp_path):
    # Sanity check of the metric itself: one flat colour per class is solved perfectly.
    rng = np.random.default_rng(0)
    for k in range(6):
        folder = tmp_path / "meta_test" / f"class{k}"
        folder.mkdir(parents=True)
        for i in range(8):
            noise = rng.integers(-3, 4, (32, 32, 3))
            pixels = np.full((32, 32, 3), 20 + 40 * k, dtype=np.int16) + noise
            Image.fromarray(pixels.astype(np.uint8), "RGB").save(folder / f"{i:04d}.png")
    assert glyphs.nearest_neighbour_accuracy(tmp_path, query=5, episodes=20) == 1.0


def test_lookalike_measure_and_pruning():
    t = glyphs.LOOKALIKE_THRESHOLD
    # Latin / Greek / Cyrillic A, l and I, and pairs that differ only in size.
    for a, b in ["AΑ", "AА", "ΑА", "lI", "Vv", "o°", "|│"]:
        assert glyphs.lookalike(a, b) >= t, (a, b)
    for a, b in ["AB", "bd", "+×", "CG"]:
        assert glyphs.lookalike(a, b) < t, (a, b)

    kept, removed = glyphs.distinct_code_points()
    candidates = glyphs.candidate_code_points()
    assert removed == len(candidates) - len(kept) > 0
    assert len(kept) >= 100
    assert sum(cp in kept for cp in (0x41, 0x391, 0x410)) == 1  # one A of three
    sim = glyphs.lookalike_matrix(kept)
    np.fill_diagonal(sim, 0.0)
    assert sim.max() < t


def test_class_choice_follows_seed():
    a, b = glyphs.choose_classes(0), glyphs.choose_classes(1)
    assert a == glyphs.choose_classes(0)
    assert a != b
    chosen = [cp for cps in a.values() for cp in cps]
    assert len(set(chosen)) == 100
    assert set(chosen) <= set(glyphs.distinct_code_points()[0])


@pytest.mark.parametrize(
    "kwargs", [{"images_per_class": 0}, {"images_per_class": -3}, {"images_per_class": 2.5},
               {"images_per_class": True}, {"seed": -1}, {"seed": "0"}, {"workers": 0}]
)
def test_bad_arguments_raise_user_error(tmp_path, kwargs):
    with pytest.raises(UserError, match="must be an integer"):
        glyphs.generate(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_fonts_raise_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(glyphs, "font_dir", lambda: tmp_path)
    with pytest.raises(UserError, match="matplotlib"):
        glyphs.generate(tmp_path / "out", images_per_class=1, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_generation_keeps_previous_tree(tmp_path, monkeypatch, workers):
    root = tmp_path / "glyphs"
    (root / "meta_train").mkdir(parents=True)  # a previous tree (a foreign file would be refused)
    (root / "meta_train" / "old.txt").write_text("previous")
    calls = 0
    real_render = glyphs.render

    def failing_render(*args):
        nonlocal calls
        calls += 1
        if calls > 5:
            raise RuntimeError("simulated crash")
        return real_render(*args)

    monkeypatch.setattr(glyphs, "render", failing_render)
    with pytest.raises(RuntimeError, match="simulated crash"):  # forked workers see the patch too
        glyphs.generate(root, images_per_class=2, progress=False, workers=workers)
    assert [p.name for p in tmp_path.iterdir()] == ["glyphs"]  # no half-written sibling
    assert (root / "meta_train" / "old.txt").read_text() == "previous"
