"""Benchmark: one meta-iteration of plain PURER against PURER with embedding distillation.

The default `dvc repro` setting (13 conv4 teachers, 64 classes, 6 bank images per class, 1 shot,
fast path, one thread), each distillation term alone and all three, in one benchmark group, so
the cost ratio is read off the same run (and the cheaper variant: 4 teachers, 8 classes):

    pytest tests/benchmarks/test_distill_iteration.py -o addopts="" --benchmark-only \\
        --benchmark-group-by=group

After each distilled mode one line gives its median over PURER's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_meta_iteration import _fake_dataset, _pool

from purer_mlops.config import from_dict
from purer_mlops.paths import Project
from purer_mlops.stages.metatrain import build_trainer

MODES = {
    "purer": {},
    "feature": {"weight": 1.0},
    "relation": {"weight": 1.0, "feature": 0.0, "relation": 1.0},
    "soft": {"weight": 1.0, "feature": 0.0, "soft": 1.0},
    "all": {"weight": 1.0, "relation": 1.0, "soft": 1.0, "mix": 0.3},
    # the cheap variant: 4 teachers of the 13 and 8 classes × 4 images per batch
    "all_cheap": {"weight": 1.0, "relation": 1.0, "soft": 1.0, "mix": 0.3, "teachers": 4, "classes": 8},
}
MEDIANS: dict[str, float] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    _fake_dataset(root)
    _pool(root, 13, random_pool=False)
    return root


@pytest.mark.parametrize("mode", list(MODES))
def test_distill_iteration(benchmark, root: Path, mode: str, capsys) -> None:
    params = from_dict({"tracking": False, "device": "cpu", "lanes": 1, "distill": MODES[mode],
                        "metatrain": {"val_episodes": 1}})
    trainer = build_trainer(params, Project(root))
    benchmark.group = "meta_iteration_distill"
    benchmark.name = f"meta_iteration_distill_{mode}"
    trainer.step()  # warm-up
    benchmark.pedantic(trainer.step, rounds=8, iterations=1)
    assert np.isfinite(trainer.history["meta_loss"][-1])
    assert (trainer.distiller is None) == (mode == "purer")
    MEDIANS[mode] = benchmark.stats.stats.median
    if mode != "purer" and "purer" in MEDIANS:
        with capsys.disabled():
            print(f"\n[distill {mode}] {MEDIANS[mode]:.3f} s per iteration, "
                  f"{MEDIANS[mode] / MEDIANS['purer']:.2f}x PURER's {MEDIANS['purer']:.3f} s")
