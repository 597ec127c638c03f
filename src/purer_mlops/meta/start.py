"""The meta-model's start ``distill.start: best_teacher``: the teacher whose embedding is the best
nearest-prototype classifier on the fixed meta-val tasks, its weights loaded into the meta-model.

The choice uses meta-val only (the tasks meta-training already validates on), never meta-test.
Each teacher is scored as the meta-model would use it: its weights in the meta-model (whose
BatchNorm normalises with the batch's statistics; the teacher's conv biases, which such a
BatchNorm cancels exactly, are dropped), its embedding classifying the queries by the nearest
support prototype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.dataset import ImageSet, TaskIndices
from ..errors import UserError
from ..lanes import ONE, Lanes
from ..models.averaging import average_into
from ..models.backbones import Classifier
from ..models.learners import build_learner
from .evaluation import task_accuracies
from .pool import Pool


def teacher_scores(model: Classifier, pool: Pool, val: ImageSet, tasks: Sequence[TaskIndices], *,
                   lanes: Lanes = ONE) -> list[float]:
    """Mean meta-val accuracy (percent) of each teacher's embedding, loaded into ``model``, with
    nearest prototype; ``model`` is left holding the last teacher."""
    learner = build_learner("protonet", model, 0, 0.0, looped=True)
    scores = []
    for sd in pool.state_dicts:
        average_into(model, [sd])
        accs = task_accuracies(learner, dict(model.named_parameters()), val, tasks, lanes=lanes)
        scores.append(100.0 * float(accs.mean()))
    return scores


def best_teacher_start(model: Classifier, pool: Pool, backbone: str, val: ImageSet, tasks: Sequence[TaskIndices],
                       *, lanes: Lanes = ONE) -> tuple[int, list[float]]:
    """Load into ``model`` the teacher best on the meta-val ``tasks``; return its index and every score."""
    blocker = pool.averaging_blocker(backbone, val.image_size)
    if blocker:
        raise UserError(f"distill.start is best_teacher but {blocker}. Set distill.start: pool.")
    scores = teacher_scores(model, pool, val, tasks, lanes=lanes)
    best = int(torch.tensor(scores).argmax())
    average_into(model, [pool.state_dicts[best]])
    return best, scores
