"""Nearest-prototype heads on frozen embeddings: the meta-model's second head, the teachers' rows.

A head classifies a task's queries by their distance, in some embedding, to the class means of
the support (ProtoNet's kernels :func:`~.learners.prototypes` and :func:`~.learners.prototype_logits`,
reused as they are). It needs no training and no test-time adaptation, so it shows what an
embedding knows on its own: a weak meta-model whose prototype head is as weak as its adaptation
has weak features; a teacher's embedding scored so is the baseline a meta-model must beat.

Two forms (:data:`FORMS`): ``euclidean``, minus the squared distance as ProtoNet uses it, and
``cosine``, :data:`SCALE` times the cosine to prototypes of unit-length embeddings (the
prototypes normalised again). :data:`FORM` was chosen on meta-val (docs/compare.md); ensembles
average the heads' softmax probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from ..data.dataset import ImageSet, TaskIndices
from ..models.backbones import fast_forward
from ..models.learners import prototype_logits, prototypes
from .tasks import stack_tasks, task_labels

# embed(images (T, N, 3, S, S)) -> embeddings (T, N, D): the N images of each of T tasks
TaskEmbed = Callable[[torch.Tensor], torch.Tensor]

FORMS = ("cosine", "euclidean")
FORM = "cosine"  # chosen on meta-val: docs/compare.md, "Nearest-prototype heads and the teacher rows"
SCALE = 10.0  # inverse temperature of the cosine form (matters for ensembles only: argmax ignores it)


def frozen_embed(model: nn.Module) -> TaskEmbed:
    """The ``features`` of a model in eval mode (a teacher): every image embedded on its own, so
    all tasks' images go through in one batch."""
    return lambda x: model.features(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def per_task_embed(model: nn.Module) -> TaskEmbed:
    """The ``features`` of a meta-model, whose BatchNorm uses batch statistics: one forward per
    task's support (or query), as its ProtoNet and MAML heads see them."""
    return lambda x: torch.stack([model.features(images) for images in x])


def head_logits(zs: torch.Tensor, ys: torch.Tensor, zq: torch.Tensor, way: int, form: str = FORM) -> torch.Tensor:
    """Logits (Q, way) of one task's query embeddings zq (Q, D) given the support's zs (S, D), ys (S,).

    For unit vectors −‖q − p‖² = 2·cos(q, p) − 2, so the cosine form is SCALE/2 times
    ProtoNet's logits on normalised embeddings and prototypes, up to a constant per query.
    """
    if form == "euclidean":
        return prototype_logits(zq, prototypes(zs, ys, way))
    if form != "cosine":
        raise ValueError(f"unknown head form {form!r}; choose one of {FORMS}")
    protos = F.normalize(prototypes(F.normalize(zs, dim=-1), ys, way), dim=-1)
    return SCALE / 2 * prototype_logits(F.normalize(zq, dim=-1), protos)


def task_probs(embed: TaskEmbed, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, way: int,
               form: str = FORM) -> torch.Tensor:
    """Class probabilities (T, Q, way) of the head on T tasks: xs (T, S, 3, H, W), ys (T, S), xq (T, Q, 3, H, W).

    The embeddings run the fast forward (the same function; it halves the meta-model's cost on CPU).
    """
    with fast_forward():
        zs, zq = embed(xs), embed(xq)
    logits = vmap(head_logits, in_dims=(0, 0, 0, None, None))(zs, ys, zq, way, form)
    return logits.softmax(-1)


def ensemble_probs(embeds: Sequence[TaskEmbed], xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, way: int,
                   form: str = FORM) -> torch.Tensor:
    """The mean over the embeddings of their heads' probabilities (T, Q, way) (shapes as :func:`task_probs`)."""
    return torch.stack([task_probs(embed, xs, ys, xq, way, form) for embed in embeds]).mean(0)


@torch.no_grad()
def head_probs(embeds: Sequence[TaskEmbed], imageset: ImageSet, tasks: Sequence[TaskIndices], *,
               form: str = FORM, chunk: int = 10, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each embedding's head on each task: probabilities (M, T, Q, way) and the query labels (T, Q).

    The tasks are stacked ``chunk`` at a time (as :func:`~.evaluation.task_accuracies` does; ten
    5-way 1-shot tasks of 15 queries are 800 images, whose conv4 activations at 32 px take ~0.1 GB),
    and each chunk is embedded by every one of the M embeddings before the next is stacked.
    """
    probs: list[list[torch.Tensor]] = [[] for _ in embeds]
    labels = []
    for start in range(0, len(tasks), chunk):
        batch = stack_tasks(imageset, tasks[start:start + chunk], torch.device(device))
        for out, embed in zip(probs, embeds, strict=True):
            out.append(task_probs(embed, batch.xs, batch.ys, batch.xq, batch.way, form).cpu())
        labels.append(batch.yq.cpu())
    return torch.stack([torch.cat(p) for p in probs]), torch.cat(labels)


@torch.no_grad()
def frozen_head_probs(models: Sequence[nn.Module], imageset: ImageSet, tasks: Sequence[TaskIndices], *,
                      form: str = FORM, chunk: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`head_probs` of frozen models (eval mode, teachers): probabilities (M, T, Q, way), labels (T, Q).

    A frozen model embeds every image on its own, so each image the tasks draw is embedded once
    per model, not once per task that draws it: the same probabilities for a fraction of the work
    (the 100 default meta-val tasks draw 1600 images 8000 times). ``chunk`` images go through at a
    time; the embeddings (U, D) of the U images drawn are all that is kept.
    """
    sup = torch.stack([t[1] for t in tasks]).flatten(1)  # (T, way·shot) image indices
    qry = torch.stack([t[2] for t in tasks]).flatten(1)  # (T, way·query)
    way, shot = tasks[0][1].shape
    used, where = torch.unique(torch.cat([sup, qry], 1), return_inverse=True)  # where: (T, way·(shot+query))
    ys, yq = task_labels(len(tasks), way, shot, "cpu"), task_labels(len(tasks), way, qry.shape[1] // way, "cpu")
    probs = []
    for model in models:
        device = next(model.parameters()).device
        with fast_forward():
            z = torch.cat([model.eval().features(imageset.normalize(imageset.images[batch]).to(device)).cpu()
                           for batch in used.split(chunk)])  # (U, D)
        zs, zq = z[where[:, :sup.shape[1]]], z[where[:, sup.shape[1]:]]  # (T, way·shot, D), (T, way·query, D)
        probs.append(vmap(head_logits, in_dims=(0, 0, 0, None, None))(zs, ys, zq, way, form).softmax(-1))
    return torch.stack(probs), yq


def accuracies(probs: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy (..., T) in [0, 1] of probabilities (..., T, Q, way) against labels (T, Q)."""
    return (probs.argmax(-1) == yq).float().mean(-1)


def prototype_accuracies(model: nn.Module, imageset: ImageSet, tasks: Sequence[TaskIndices],
                         form: str = FORM) -> torch.Tensor:
    """Accuracy (T,) of nearest prototype on a meta-model's own embedding: its second head."""
    device = next(model.parameters()).device
    probs, yq = head_probs([per_task_embed(model)], imageset, tasks, form=form, device=device)
    return accuracies(probs[0], yq)
