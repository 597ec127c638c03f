"""Test-time adaptation on real tasks: per-task accuracies and their 95% interval.

Used for meta-validation during meta-training and for meta-testing. Tasks are index
triples from :func:`~purer_mlops.data.dataset.fixed_tasks`, so every method is scored on
the very same images. Adaptation runs on detached meta-parameters under ``no_grad``:
no second-order graph is ever built at test time (the reference built and discarded one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from ..data.dataset import ImageSet, TaskIndices
from ..lanes import ONE, Lanes
from ..models.learners import MetaLearner, Weights
from .tasks import TaskBatch, stack_tasks

# predict(weights, tasks) -> query logits (T, Q, way) of the T tasks (ICFIL.batch)
Predictor = Callable[[Weights, TaskBatch], torch.Tensor]


def channels_last_on_cpu(learner: MetaLearner, weights: Weights) -> bool:
    """Whether test-time adaptation runs channels-last: a looped learner on CPU, where the
    meta-model's small convolutions run ~1.6x faster so (first order; docs/performance.md)."""
    return learner.looped and next(iter(weights.values())).device.type == "cpu"


def channels_last(weights: Weights) -> Weights:
    """The same weights, the convolutions' (4-D) channels-last in memory."""
    return {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in weights.items()}


def _accuracies(learner: MetaLearner, weights: Weights, tasks: TaskBatch, predict: Predictor | None
                ) -> torch.Tensor:
    """Accuracy (T,) of each task of ``tasks`` after adaptation.

    A looped learner runs the tasks one after another: its forward cannot run under ``vmap``
    (channels-last max-pool indices), and looped it is still 1.3-1.8x faster than the elementary
    forward under ``vmap`` on CPU (docs/performance.md); any other learner runs them under ``vmap``.
    """
    if len(tasks) == 0:  # a lane without tasks
        return torch.zeros(0, device=tasks.yq.device)
    if predict is not None:
        return (predict(weights, tasks).argmax(2) == tasks.yq).float().mean(1)
    with torch.no_grad():
        return learner.batch_loss(weights, tasks, batched=not learner.looped)[1]


def task_accuracies(learner: MetaLearner, weights: Weights, imageset: ImageSet,
                    tasks: Sequence[TaskIndices], *, chunk: int = 50, progress: bool = False,
                    predict: Predictor | None = None, lanes: Lanes = ONE) -> torch.Tensor:
    """Accuracy (in [0, 1]) of the adapted meta-model on each task; shape (len(tasks),).

    ``predict`` replaces the learner's own adaptation (ICFIL uses it); tasks are
    stacked ``chunk`` at a time, and each chunk's tasks are shared among the ``lanes``.
    """
    device = next(iter(weights.values())).device
    weights = {k: v.detach() for k, v in weights.items()}
    nhwc = predict is None and channels_last_on_cpu(learner, weights)
    if nhwc:
        weights = channels_last(weights)
    learners = learner.replicas(lanes.count)
    out = []
    for start in tqdm(range(0, len(tasks), chunk), desc="tasks", disable=not progress, leave=False):
        batch = stack_tasks(imageset, tasks[start:start + chunk], device)
        if nhwc:
            batch = batch.channels_last()

        def lane_accuracies(lane: int, share: range, batch: TaskBatch = batch) -> torch.Tensor:
            return _accuracies(learners[lane], weights, batch.select(slice(share.start, share.stop)), predict).cpu()

        out += lanes.map(lane_accuracies, len(batch))
    return torch.cat(out)


def mean_ci95(values: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and 95% half-interval 1.96·std/√n (population std, as the reference) of values."""
    v = torch.as_tensor(values, dtype=torch.float64)
    n = v.numel()
    if n == 0:
        raise ValueError("no values to summarise")
    return float(v.mean()), float(1.96 * v.std(unbiased=False) / math.sqrt(n))
