"""A pool with a near-chance teacher stops `purer pretrain`, keeps the previous pool and shows why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import new_project, random_pool, run_purer, write_params
from test_pretrain import make_dataset

from purer_mlops.errors import UserError
from purer_mlops.models.pool_storage import read_records
from purer_mlops.teachers.pool_table import TeacherRow, check_quality, format_table

# 10 classes of 30 images: teacher_000 gets five learnable classes, teacher_001 five classes of
# pure noise (chance: 20 %, 30 held-out images).
QUICK = {"pretrain.steps": 100, "pretrain.max_steps": 100, "pretrain.batch_size": 16, "tracking": False,
         "device": "cpu"}


@pytest.fixture
def noisy_project(tmp_path: Path) -> Path:
    root = new_project(tmp_path / "project")
    make_dataset(root, "glyphs", classes=10, per_class=30, learnable=5)
    write_params(root, QUICK)
    random_pool(root / "models" / "teachers", [("conv4", 32, (0, 1, 2, 3, 4))])  # the previous pool
    return root


def test_a_near_chance_teacher_fails_the_stage_and_keeps_the_previous_pool(noisy_project: Path) -> None:
    root = noisy_project
    before = {p.name: p.read_bytes() for p in (root / "models" / "teachers").iterdir()}
    proc = run_purer(root, "pretrain", "--quiet")
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error:") and "1 of 2 teachers" in error and "teacher_001" in error
    assert "pretrain.min_accuracy = 50" in error and "lower pretrain.min_accuracy" in error
    assert "teacher_000" not in error and "results/pretrain/teachers.md" in error
    # the augmentation knobs in force for the weak teacher's dataset, so that a user can act on them
    assert "glyphs: augment.flip=off, augment.recolour=on, augment.crop_pad=4" in error
    assert proc.stdout == ""  # no metrics: the stage did not succeed
    # the table is printed and written, the weak teacher marked
    printed = [line for line in proc.stderr.splitlines() if line.startswith("| teacher_")]
    assert len(printed) == 2 and "LOW" in printed[1] and "LOW" not in printed[0]
    table = (root / "results" / "pretrain" / "teachers.md").read_text()
    assert "**Failed:**" in table and "class_05, class_06" in table
    assert not (root / "results" / "pretrain" / "metrics.json").exists()
    assert not (root / "results" / "pretrain" / "details.json").exists()
    # the previous pool is untouched, byte for byte
    assert {p.name: p.read_bytes() for p in (root / "models" / "teachers").iterdir()} == before


def test_lowering_the_threshold_accepts_the_pool(noisy_project: Path) -> None:
    root = noisy_project
    write_params(root, {"pretrain.min_accuracy": 0.0})
    proc = run_purer(root, "pretrain", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)
    records = read_records(root / "models" / "teachers")
    assert [r.class_ids for r in records] == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    accs = [metrics["by_teacher"][name]["accuracy"] for name in ("teacher_000", "teacher_001")]
    assert accs == [r.accuracy for r in records]
    assert accs[0] >= 80 and accs[1] < 50  # the learnable block is learnt, the noise block is not
    assert "Failed" not in (root / "results" / "pretrain" / "teachers.md").read_text()


def _row(name: str, acc: float) -> TeacherRow:
    return TeacherRow(name=name, arch="conv4", dataset="glyphs", class_ids=(0, 1, 2, 3, 4),
                      classes=("a", "b", "c", "d", "e"), accuracy=acc, best_epoch=3, epochs=9, steps=18)


def test_quality_check_names_at_most_three_weak_teachers() -> None:
    rows = [_row(f"teacher_{i:03d}", acc) for i, acc in enumerate([90.0, 10.0, 20.0, 30.0, 40.0])]
    with pytest.raises(UserError) as err:
        check_quality(rows, 45.0, "t.md")
    message = str(err.value)
    assert "4 of 5 teachers" in message and "teacher_003" in message and "and 1 more" in message
    assert "teacher_004" not in message and "teacher_000" not in message and "\n" not in message
    with pytest.raises(UserError, match=r"no longer of its class; now glyphs: augment.flip=on\), or make") as err:
        check_quality(rows, 45.0, "t.md", {"glyphs": "augment.flip=on", "cifar100": "augment.flip=on, x"})
    assert "cifar100" not in str(err.value)  # only the weak teachers' datasets
    check_quality(rows, 10.0, "t.md")  # none below: no error
    text = format_table(rows, 45.0, names=False)
    assert "| epochs | steps | restarts |" in text
    assert "teacher_000 | conv4 | glyphs | 0–4 | 90.0 | 3 | 9 | 18 | 0 |" in text
    assert "min 10.0 % (teacher_001)" in text and "a, b, c" not in text
