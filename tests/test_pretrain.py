"""Tests for teacher pretraining, on tiny real PNG datasets (32 px, a few classes and epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from purer_mlops.config import from_dict
from purer_mlops.data.dataset import load_split
from purer_mlops.data.filelist import write_filelists
from purer_mlops.data.registry import SPLITS
from purer_mlops.errors import UserError
from purer_mlops.lanes import open_lanes
from purer_mlops.models.backbones import build_backbone
from purer_mlops.models.pool_storage import load_pool, read_records
from purer_mlops.paths import Project
from purer_mlops.stages.pretrain import run
from purer_mlops.teachers.training import accuracy as heldout_accuracy
from purer_mlops.teachers.training import (
    block_label_sets,
    plan_pool,
    teacher_data,
    train_teacher,
    training_forward,
)


def make_dataset(root: Path, name: str, classes: int, per_class: int, seed: int = 0,
                 learnable: int | None = None) -> Path:
    """``root/data/<name>`` with ``classes`` classes in meta_train, two tiny classes in
    meta_val/meta_test, and filelists. The first ``learnable`` classes (default: all) have a
    bright square at a class-specific place on noise; the others are noise alone, which no
    teacher can tell apart."""
    folder = root / "data" / name
    rng = np.random.default_rng(seed)
    for split in SPLITS:
        n, k = (classes, per_class) if split == "meta_train" else (2, 2)
        for c in range(n):
            cls = folder / split / f"class_{c:02d}"
            cls.mkdir(parents=True)
            for i in range(k):
                img = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)
                y, x = divmod(c % 9, 3)
                if learnable is None or c < learnable:
                    img[y * 10:y * 10 + 10, x * 10:x * 10 + 10, c % 3] = 255
                Image.fromarray(img).save(cls / f"{i:03d}.png")
    write_filelists(folder)
    return folder


def params(pretrain: dict | None = None, **changes):
    """Tiny pretraining params; ``pretrain`` updates the section (no accuracy floor: 2 epochs)."""
    section = {"epochs": 2, "batch_size": 16, "min_accuracy": 0.0, **(pretrain or {})}
    return from_dict({"dataset": "glyphs", "pretrain": section, **changes})


@pytest.fixture(scope="module")
def glyph_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    make_dataset(root, "glyphs", classes=12, per_class=10)
    return root


def test_block_label_sets_cover_every_class_with_full_teachers() -> None:
    sets = block_label_sets(64, 5)
    assert len(sets) == 13 and sets[-1] == (59, 60, 61, 62, 63) and sets[-2] == (55, 56, 57, 58, 59)
    assert all(len(s) == 5 for s in sets) and set().union(*sets) == set(range(64))
    assert block_label_sets(10, 5) == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]


def test_blocks_pool(glyph_root: Path) -> None:
    metrics = run(params(), Project(glyph_root), progress=False)
    records = read_records(glyph_root / "models" / "teachers")
    assert [r.class_ids for r in records] == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (7, 8, 9, 10, 11)]
    assert records[2].classes == tuple(f"class_{c:02d}" for c in (7, 8, 9, 10, 11))
    assert {r.arch for r in records} == {"conv4"} and all(0 <= r.accuracy <= 100 for r in records)
    saved = json.loads((glyph_root / "results" / "pretrain" / "details.json").read_text())
    assert saved == metrics
    headline = json.loads((glyph_root / "results" / "pretrain" / "metrics.json").read_text())
    assert headline == {"teacher_mean": round(metrics["acc_mean"], 2),
                        "teacher_worst": round(min(r.accuracy for r in records), 2)}
    assert metrics["teachers"] == 3 and metrics["by_arch"]["conv4"]["teachers"] == 3
    accs = [r.accuracy for r in records]
    assert metrics["acc_min"] == min(accs) and metrics["acc_mean"] == pytest.approx(sum(accs) / 3)
    assert metrics["wall_seconds"] > 0
    assert len(load_pool(glyph_root / "models" / "teachers")) == 3
    # the per-teacher table: one row per teacher with its classes, accuracy and epochs
    assert list(metrics["by_teacher"]) == ["teacher_000", "teacher_001", "teacher_002"]
    assert [t["accuracy"] for t in metrics["by_teacher"].values()] == accs
    assert all(t["epochs"] == 2 and 1 <= t["best_epoch"] <= 2 for t in metrics["by_teacher"].values())
    table = (glyph_root / "results" / "pretrain" / "teachers.md").read_text().splitlines()
    row = next(line for line in table if line.startswith("| teacher_002 "))
    assert "| 7–11 |" in row and f"| {accs[2]:.1f}" in row and "class_07, class_08" in row
    assert "Failed" not in "\n".join(table)


def test_random_pool(glyph_root: Path) -> None:
    p = params(pool_mode="random", APInum=4, way_pretrain=3)
    specs = plan_pool(p, {"glyphs": 12})
    assert specs == plan_pool(p, {"glyphs": 12})  # seeded
    assert specs != plan_pool(p.replace(seed=1), {"glyphs": 12})
    run(p, Project(glyph_root), progress=False)
    records = read_records(glyph_root / "models" / "teachers")
    assert [r.class_ids for r in records] == [s.class_ids for s in specs]
    assert len(records) == 4
    assert all(len(set(r.class_ids)) == 3 and max(r.class_ids) < 12 for r in records)


def test_random_pool_splits_teachers_across_datasets() -> None:
    p = params(pool_mode="random", APInum=5, pool_datasets=["glyphs", "cifar100"], average=False)
    specs = plan_pool(p, {"glyphs": 12, "cifar100": 8})
    assert [s.dataset for s in specs] == ["glyphs"] * 3 + ["cifar100"] * 2
    assert [s.index for s in specs] == list(range(5))


def test_way_larger_than_dataset_is_refused() -> None:
    with pytest.raises(UserError, match="way_pretrain"):
        plan_pool(params(way_pretrain=13), {"glyphs": 12})


def test_mixed_architectures(tmp_path: Path) -> None:
    make_dataset(tmp_path, "glyphs", classes=8, per_class=3)
    p = params(pre_backbone="mix", way_pretrain=2, average=False,
               pretrain={"epochs": 1, "batch_size": 8})
    metrics = run(p, Project(tmp_path), progress=False)
    pool = load_pool(tmp_path / "models" / "teachers")
    assert [r.arch for r, _ in pool] == ["conv4", "resnet10", "resnet18", "conv4"]
    assert set(metrics["by_arch"]) == {"conv4", "resnet10", "resnet18"}
    assert metrics["by_arch"]["conv4"]["teachers"] == 2


def test_pool_over_two_datasets(tmp_path: Path) -> None:
    make_dataset(tmp_path, "glyphs", classes=6, per_class=5)
    make_dataset(tmp_path, "cifar100", classes=4, per_class=5, seed=1)
    p = params(pool_datasets=["glyphs", "cifar100"], average=False, way_pretrain=3)
    metrics = run(p, Project(tmp_path), progress=False)
    records = read_records(tmp_path / "models" / "teachers")
    assert [(r.dataset, r.class_ids) for r in records] == [
        ("glyphs", (0, 1, 2)), ("glyphs", (3, 4, 5)),
        ("cifar100", (0, 1, 2)), ("cifar100", (1, 2, 3))]
    assert records[0].mean != records[2].mean  # each teacher keeps its dataset's normalisation
    assert metrics["by_dataset"]["cifar100"]["teachers"] == 2


def test_saved_weights_are_the_best_epoch_not_the_live_ones(glyph_root: Path) -> None:
    p = params(pretrain={"epochs": 4, "batch_size": 16})
    imageset = load_split("glyphs", glyph_root / "data" / "glyphs", "meta_train")
    spec = plan_pool(p, {"glyphs": 12})[1]
    history: list[float] = []

    def after_epoch(epoch: int, acc: float, model: torch.nn.Module) -> None:
        history.append(acc)
        if epoch == p.pretrain.epochs - 1:
            # wreck the live weights after the last epoch: a "best" that aliases them breaks
            with torch.no_grad():
                for t in model.state_dict().values():
                    t.zero_()

    trained = train_teacher(spec, imageset, p, on_epoch=after_epoch)
    assert len(history) == 4 and trained.accuracy == max(history) == history[trained.best_epoch - 1]
    assert all(bool(t.any()) for k, t in trained.state.items() if k.endswith("weight"))
    _, _, x_ho, y_ho = teacher_data(spec, imageset, p)
    model = build_backbone(spec.arch, len(spec.class_ids), 32)
    model.load_state_dict(trained.state)
    assert heldout_accuracy(model, x_ho, y_ho) == trained.accuracy


def test_same_seed_gives_identical_files_and_teachers_are_independent(tmp_path: Path,
                                                                      glyph_root: Path) -> None:
    p = params(pretrain={"epochs": 1, "batch_size": 16}, lanes=2)
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        (root / "data").mkdir(parents=True)
        (root / "data" / "glyphs").symlink_to(glyph_root / "data" / "glyphs")
        run(p, Project(root), progress=False)
    files = [sorted((r / "models" / "teachers").iterdir()) for r in roots]
    assert [f.name for f in files[0]] == [f.name for f in files[1]] and len(files[0]) == 4
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*files, strict=True))
    # teachers 1 and 2 (trained on the second lane, and alone on the first) each trained alone
    # at a lane's thread count give the pool's teachers 1 and 2
    imageset = load_split("glyphs", glyph_root / "data" / "glyphs", "meta_train")
    pool = load_pool(roots[0] / "models" / "teachers")
    for index in (1, 2):
        with open_lanes(p.lanes):
            state = train_teacher(plan_pool(p, {"glyphs": 12})[index], imageset, p).state
        pooled = pool[index][1].state_dict()
        assert all(torch.equal(v, pooled[k]) for k, v in state.items()), index
    # ... and another seed gives another teacher
    other = train_teacher(plan_pool(p.replace(seed=1), {"glyphs": 12})[2], imageset, p).state
    assert not torch.equal(other["head.weight"], pool[2][1].state_dict()["head.weight"])



def test_compiled_training_step_gives_the_eager_loss_and_gradients(glyph_root: Path) -> None:
    imageset = load_split("glyphs", glyph_root / "data" / "glyphs", "meta_train")
    p = params(pretrain={"compile": True})
    spec = plan_pool(p, {"glyphs": 12})[0]
    x, y, _, _ = teacher_data(spec, imageset, p)
    torch.manual_seed(0)
    model = build_backbone(spec.arch, len(spec.class_ids), 32).to(memory_format=torch.channels_last).train()
    assert training_forward(model, params()) is model
    compiled = training_forward(model, p)
    assert compiled is not model
    grads = []
    for forward in (model, compiled):
        loss = torch.nn.functional.cross_entropy(forward(x), y)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
        assert torch.isfinite(loss)
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-4


def test_compile_without_a_cxx_compiler_stops_before_training(glyph_root: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    (root / "data" / "glyphs").symlink_to(glyph_root / "data" / "glyphs")
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match=r"'pretrain.compile' is true but no C\+\+ compiler.*apt-get install g\+\+"):
        run(params(pretrain={"compile": True}), Project(root), progress=False)
    assert not (root / "models" / "teachers").exists() and not (root / "results").exists()
