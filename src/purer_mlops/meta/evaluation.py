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

from ..data.dataset import ImageSet
from .learners import MetaLearner, Params

TaskIndices = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def stack_tasks(imageset: ImageSet, tasks: Sequence[TaskIndices], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised images and labels of T tasks: xs (T, way·shot, 3, S, S), ys (T, way·shot), xq, yq."""
    sup = torch.stack([t[1] for t in tasks])  # (T, way, shot)
    qry = torch.stack([t[2] for t in tasks])  # (T, way, query)
    n, way, shot = sup.shape
    query = qry.shape[2]
    xs = imageset.normalize(imageset.images[sup.reshape(n, -1)].to(device))
    xq = imageset.normalize(imageset.images[qry.reshape(n, -1)].to(device))
    ys = torch.arange(way, device=device).repeat_interleave(shot).expand(n, -1)
    yq = torch.arange(way, device=device).repeat_interleave(query).expand(n, -1)
    return xs, ys, xq, yq


def task_accuracies(learner: MetaLearner, params: Params, imageset: ImageSet,
                    tasks: Sequence[TaskIndices], *, chunk: int = 50, progress: bool = False,
                    predict: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Accuracy (in [0, 1]) of the adapted meta-model on each task; shape (len(tasks),).

    ``predict(params, xs, ys, xq, way) -> logits (Q, way)`` replaces the learner's own
    adaptation for one task (ICFIL uses it); without it, tasks run ``chunk`` at a time
    under ``vmap``.
    """
    device = next(iter(params.values())).device
    params = {k: v.detach() for k, v in params.items()}
    way = int(tasks[0][0].numel())
    out = []
    for start in tqdm(range(0, len(tasks), chunk), desc="tasks", disable=not progress, leave=False):
        xs, ys, xq, yq = stack_tasks(imageset, tasks[start:start + chunk], device)
        if predict is None:
            with torch.no_grad():
                _, acc = learner.batch_loss(params, xs, ys, xq, yq, way, batched=True)
        else:
            acc = torch.stack([(predict(params, xs[i], ys[i], xq[i], way).argmax(1) == yq[i]).float().mean()
                               for i in range(xs.shape[0])])
        out.append(acc.cpu())
    return torch.cat(out)


def mean_ci95(values: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and 95% half-interval 1.96·std/√n (population std, as the reference) of values."""
    v = torch.as_tensor(values, dtype=torch.float64)
    n = v.numel()
    if n == 0:
        raise ValueError("no values to summarise")
    return float(v.mean()), float(1.96 * v.std(unbiased=False) / math.sqrt(n))
