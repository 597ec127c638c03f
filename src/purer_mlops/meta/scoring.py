"""Scoring a meta-model on fixed, seeded real tasks (stage ``metatest`` and the comparison table).

The same seed gives every method the same tasks, so differences are paired: the mean accuracy
with its 95% interval (1.96·std/√n), and the paired difference of two methods on shared tasks.
"""

from __future__ import annotations

import torch

from ..compiling import check_compiler
from ..config import Params
from ..data.dataset import ImageSet, TaskIndices, fixed_tasks, load_split
from ..lanes import lane_count, open_lanes
from ..models.learners import build_learner
from ..paths import Project
from .evaluation import mean_ci95, task_accuracies
from .icfil import ICFIL


def fixed_test_tasks(params: Params, project: Project, shot: int | None = None
                     ) -> tuple[ImageSet, list[TaskIndices]]:
    """meta_test and its fixed tasks: same seed → same images for every method."""
    test = load_split(params.dataset, project.dataset(params.dataset), "meta_test")
    shot = shot or params.num_sup_test
    test.check_task_shape(params.way_test, shot, params.num_qur_test,
                          ("way_test", "num_sup_test", "num_qur_test"))
    return test, fixed_tasks(test, params.episode_test, params.way_test, shot, params.num_qur_test,
                             seed=params.metatest.seed)


def score(params: Params, model: torch.nn.Module, test: ImageSet, tasks: list[TaskIndices], *, meta_learner: str,
          icfil: bool = False, progress: bool = False) -> torch.Tensor:
    """Per-task accuracies (in [0, 1]) of ``model``, meta-trained as ``meta_learner`` (its card's), adapted
    with the test-time settings, the tasks shared among the ``lanes`` (ICFIL: one lane)."""
    device = next(model.parameters()).device
    if params.metatest.compile:
        check_compiler(device, "metatest.compile")
    learner = build_learner(meta_learner, model, params.test_inner_update_num, params.inner_lr, looped=True,
                            compiled=params.metatest.compile)
    predict = ICFIL(learner, params.calibration, params.inversion, params.metatest.seed).batch if icfil else None
    with open_lanes(lane_count(params.lanes, device, params.metatest.compile or icfil)) as lanes:
        return task_accuracies(learner, dict(model.named_parameters()), test, tasks, progress=progress,
                               predict=predict, lanes=lanes)


def paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean and 95% interval (percent) of the per-task difference a − b on shared tasks."""
    mean, ci = mean_ci95(100.0 * (a - b))
    return {"difference": mean, "ci95": ci}


def summary(accs: torch.Tensor) -> dict[str, float]:
    """Mean accuracy and its 95% interval (percent) over tasks, and the task count."""
    mean, ci = mean_ci95(100.0 * accs)
    return {"accuracy": mean, "ci95": ci, "episodes": int(accs.numel())}
