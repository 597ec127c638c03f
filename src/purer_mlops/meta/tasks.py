"""Few-shot tasks as meta-learners consume them: a :class:`TaskBatch` of T stacked tasks.

Pseudo tasks come from the learnable bank (:func:`sample_pseudo_tasks`), real ones from an
:class:`~purer_mlops.data.dataset.ImageSet`, either drawn now (:func:`sample_real_tasks`, the
oracle) or from fixed index triples (:func:`stack_tasks`, meta-validation and meta-testing).
Every task's labels are 0..way-1 in class order, support and query images disjoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.dataset import ImageSet, TaskIndices, sample_task_indices


@dataclass(frozen=True)
class TaskBatch:
    """T stacked ``way``-way tasks.

    Attributes:
        xs: support images (T, way·shot, 3, S, S); ys: their labels (T, way·shot).
        xq: query images (T, way·query, 3, S, S); yq: their labels (T, way·query).
        way: classes per task.
    """

    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    way: int

    def __len__(self) -> int:
        return self.xs.shape[0]

    def select(self, index: Sequence[int] | slice) -> TaskBatch:
        """The tasks at ``index`` (a list of task numbers or a slice), as a batch."""
        pick = (lambda t: t[index]) if isinstance(index, slice) else (lambda t: t[list(index)])
        return TaskBatch(pick(self.xs), pick(self.ys), pick(self.xq), pick(self.yq), self.way)

    def task(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Task ``i`` as (xs (way·shot, 3, S, S), ys (way·shot,), xq (way·query, 3, S, S), yq (way·query,))."""
        return self.xs[i], self.ys[i], self.xq[i], self.yq[i]

    def channels_last(self) -> TaskBatch:
        """The same tasks with every task's images (N, 3, S, S) channels-last in memory."""
        def nhwc(x: torch.Tensor) -> torch.Tensor:  # (T, N, 3, S, S), stored as (T, N, S, S, 3)
            return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        return TaskBatch(nhwc(self.xs), self.ys, nhwc(self.xq), self.yq, self.way)

    def to(self, dtype: torch.dtype) -> TaskBatch:
        """The same tasks with images of ``dtype`` (labels unchanged)."""
        return TaskBatch(self.xs.to(dtype), self.ys, self.xq.to(dtype), self.yq, self.way)


def task_labels(tasks: int, way: int, per_class: int, device: torch.device) -> torch.Tensor:
    """Labels (tasks, way·per_class): 0 × per_class, 1 × per_class, ... for every task."""
    return torch.arange(way, device=device).repeat_interleave(per_class).expand(tasks, -1)


def sample_pseudo_tasks(bank: torch.Tensor, tasks: int, way: int, shot: int, query: int,
                        gen: torch.Generator) -> TaskBatch:
    """``tasks`` pseudo tasks from the bank (C, P, 3, S, S): ``way`` classes among all C, disjoint images."""
    n_cls, per_class = bank.shape[:2]
    cls = torch.stack([torch.randperm(n_cls, generator=gen)[:way] for _ in range(tasks)])
    pick = torch.stack([torch.stack([torch.randperm(per_class, generator=gen)[: shot + query]
                                     for _ in range(way)]) for _ in range(tasks)])
    cls, pick = cls.to(bank.device), pick.to(bank.device)
    imgs = bank[cls.unsqueeze(-1), pick]  # (T, way, shot+query, 3, S, S)
    return TaskBatch(imgs[:, :, :shot].flatten(1, 2), task_labels(tasks, way, shot, bank.device),
                     imgs[:, :, shot:].flatten(1, 2), task_labels(tasks, way, query, bank.device), way)


def stack_tasks(imageset: ImageSet, tasks: Sequence[TaskIndices], device: torch.device) -> TaskBatch:
    """The normalised images and labels of the tasks given as index triples (classes, support, query)."""
    sup = torch.stack([t[1] for t in tasks])  # (T, way, shot)
    qry = torch.stack([t[2] for t in tasks])  # (T, way, query)
    n, way, shot = sup.shape
    xs = imageset.normalize(imageset.images[sup.reshape(n, -1)].to(device))
    xq = imageset.normalize(imageset.images[qry.reshape(n, -1)].to(device))
    return TaskBatch(xs, task_labels(n, way, shot, device), xq, task_labels(n, way, qry.shape[2], device), way)


def sample_real_tasks(imageset: ImageSet, tasks: int, way: int, shot: int, query: int,
                      gen: torch.Generator, device: torch.device) -> TaskBatch:
    """Like :func:`sample_pseudo_tasks`, from real images (the oracle)."""
    return stack_tasks(imageset, [sample_task_indices(imageset.by_class, way, shot, query, gen)
                                  for _ in range(tasks)], device)
