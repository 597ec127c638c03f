"""Benchmarks of test-time adaptation (meta-val, meta-test): plain under vmap against fast in a loop.

One group per predictor, ``plain`` and ``fast`` timed in the same run:

    OMP_NUM_THREADS=1 pytest tests/benchmarks/test_test_time.py -o addopts="" --benchmark-only \
        --benchmark-group-by=group

50 random 5-way 1-shot tasks with 15 queries per class at 32 px (one chunk of
``task_accuracies``), a conv4 meta-model with batch-statistics BatchNorm, MAML with the
default 10 test-time steps (``fast_channels_last``: weights and images channels-last, as
``task_accuracies`` runs a looped learner on CPU; ``fast_compiled``: each step under
``torch.compile``, its compilation timed apart); ``icfil`` adds ICFIL with the default calibration knobs (its cost
relative to plain adaptation is printed for each path). Both
paths give the same accuracies (tests/test_learners.py and tests/test_icfil.py check the
logits in float64).
"""

from __future__ import annotations

import time

import pytest
import torch

from purer_mlops.config import Params
from purer_mlops.meta.evaluation import channels_last
from purer_mlops.meta.icfil import ICFIL
from purer_mlops.meta.tasks import TaskBatch, task_labels
from purer_mlops.models.backbones import build_backbone
from purer_mlops.models.learners import build_learner

TASKS, WAY, SHOT, QUERY, SIZE = 50, 5, 1, 15, 32
MEDIANS: dict[tuple[str, str], float] = {}


def _tasks() -> TaskBatch:
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(TASKS, WAY * SHOT, 3, SIZE, SIZE, generator=gen)
    xq = torch.randn(TASKS, WAY * QUERY, 3, SIZE, SIZE, generator=gen)
    return TaskBatch(xs, task_labels(TASKS, WAY, SHOT, "cpu"), xq, task_labels(TASKS, WAY, QUERY, "cpu"), WAY)


@pytest.mark.parametrize(("predictor", "mode"), [
    ("adaptation", "plain"), ("adaptation", "fast"), ("adaptation", "fast_channels_last"),
    ("adaptation", "fast_compiled"),
    ("icfil", "plain"), ("icfil", "fast")])
def test_test_time(benchmark, predictor: str, mode: str, capsys) -> None:
    torch.manual_seed(0)
    model = build_backbone("conv4", WAY, SIZE, track_running_stats=False)
    weights = {k: v.detach() for k, v in model.named_parameters()}
    params = Params()
    learner = build_learner("maml", model, params.test_inner_update_num, params.inner_lr,
                            looped=mode.startswith("fast"), compiled=mode == "fast_compiled")
    tasks = _tasks()
    if mode == "fast_channels_last":
        weights, tasks = channels_last(weights), tasks.channels_last()
    if predictor == "icfil":
        icfil = ICFIL(learner, params.calibration, params.inversion, seed=0)

        def run() -> torch.Tensor:
            return icfil.batch(weights, tasks)
    else:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return learner.batch_loss(weights, tasks, batched=mode == "plain")[1]

    benchmark.group = f"test_time_{predictor}"
    benchmark.name = f"test_time_{predictor}_{mode}"
    if mode == "fast_compiled":  # the first chunk compiles: timed apart
        started = time.perf_counter()
        run()
        with capsys.disabled():
            print(f"\n[{predictor}] first chunk (compiling) {time.perf_counter() - started:.1f} s")
    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0 if mode == "fast_compiled" else 1)
    assert torch.isfinite(out).all()
    median = MEDIANS[predictor, mode] = benchmark.stats.stats.median
    lines = []
    if (predictor, "plain") in MEDIANS and (predictor, "fast") in MEDIANS:
        plain, fast = MEDIANS[predictor, "plain"], MEDIANS[predictor, "fast"]
        lines.append(f"[{predictor}] {TASKS} tasks: plain {plain:.2f} s, fast {fast:.2f} s, "
                     f"plain/fast {plain / fast:.2f}x")
        if mode in ("fast_channels_last", "fast_compiled"):
            lines.append(f"[{predictor}] {mode} {median:.2f} s, fast/{mode} {fast / median:.2f}x")
    if predictor == "icfil" and ("adaptation", mode) in MEDIANS:  # ICFIL's cost (issue #15: at most 3x)
        lines.append(f"[{mode}] ICFIL / plain adaptation: {median / MEDIANS['adaptation', mode]:.2f}x")
    with capsys.disabled():
        print("".join(f"\n{line}" for line in lines))
