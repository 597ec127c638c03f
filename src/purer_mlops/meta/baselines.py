"""The teachers' own few-shot accuracy: the honest baselines of a data-free meta-model.

Every teacher's embedding (its ``features``, (B, D)) with a nearest-prototype head
(:mod:`.heads`) is a few-shot classifier that needs no meta-training at all. Three rows of the
comparison table (docs/compare.md) come from them, on the same fixed meta-test tasks as every
meta-model, so all differences pair:

- ``teacher-best``: the teacher whose head is most accurate on the fixed meta-val tasks (those
  meta-training selects its checkpoints on), then scored on meta-test;
- ``teacher-mean``: per task, the mean over the teachers of their meta-test accuracies;
- ``teachers-ensemble``: the mean over the teachers of their heads' probabilities, one
  classifier that costs N teacher forward passes per image (N teachers); the registry's meta-val
  score of the served ensemble (:mod:`~purer_mlops.serve.registry`) is this row on meta-val.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import Params
from ..data.dataset import ImageSet, TaskIndices, fixed_tasks, load_split
from ..errors import UserError
from ..models.pool_storage import TeacherRecord, load_pool
from ..paths import Project
from .heads import FORM, accuracies, frozen_head_probs

TEACHER_METHODS = ("teacher-best", "teacher-mean", "teachers-ensemble")


def space_blocker(records: Sequence[TeacherRecord], imageset: ImageSet) -> str | None:
    """Why the teachers cannot embed ``imageset``'s images as they are; None when all can.

    A teacher sees the dataset's normalised images unchanged, so it must share their size
    and normalisation (a resized or re-normalised input would score another classifier).
    """
    for r in records:
        if (r.image_size, tuple(r.mean), tuple(r.std)) != (imageset.image_size, tuple(imageset.mean),
                                                          tuple(imageset.std)):
            return (f"{r.name} expects {r.image_size} px images normalised with mean {list(r.mean)}, std "
                    f"{list(r.std)}, but {imageset.name} has {imageset.image_size} px, mean {list(imageset.mean)}, "
                    f"std {list(imageset.std)}: the teacher rows need a pool of the dataset's image space")
    return None


@dataclass(frozen=True)
class TeacherScores:
    """Per-task accuracies (in [0, 1]) of every teacher's head and of their ensemble.

    Attributes:
        names: the teachers' names (``teacher_000``, ...), N of them.
        val: (N, V) on the V meta-val tasks; test: (N, T) on the T meta-test tasks.
        val_ensemble: (V,); test_ensemble: (T,).
        form: the head's form (:data:`.heads.FORMS`).
    """

    names: list[str]
    val: torch.Tensor
    test: torch.Tensor
    val_ensemble: torch.Tensor
    test_ensemble: torch.Tensor
    form: str

    @property
    def best(self) -> int:
        """Index of the teacher with the highest mean meta-val accuracy (the first on a tie)."""
        return int(self.val.mean(1).argmax())

    def accuracies(self, method: str) -> torch.Tensor:
        """Per-task meta-test accuracies (T,) of the row ``method`` (one of :data:`TEACHER_METHODS`)."""
        rows = {"teacher-best": lambda: self.test[self.best], "teacher-mean": lambda: self.test.mean(0),
                "teachers-ensemble": lambda: self.test_ensemble}
        if method not in rows:
            raise ValueError(f"unknown teacher row {method!r}; choose one of {TEACHER_METHODS}")
        return rows[method]()

    def note(self, method: str) -> str:
        """What the row ``method`` is, with its meta-val accuracy (percent)."""
        val = 100 * self.val.mean(1)
        if method == "teacher-best":
            return f"{self.names[self.best]}, meta-val {val[self.best]:.2f}% (best of {len(self.names)})"
        if method == "teacher-mean":
            return (f"mean of {len(self.names)} teachers, meta-val {val.mean():.2f}% "
                    f"(range {val.min():.2f}–{val.max():.2f})")
        return (f"{len(self.names)} teachers, {len(self.names)} forward passes per image, "
                f"meta-val {100 * self.val_ensemble.mean():.2f}%")


def teacher_accuracies(teachers: Sequence[tuple[TeacherRecord, torch.nn.Module]], imageset: ImageSet,
                       tasks: Sequence[TaskIndices], form: str = FORM) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task accuracies of every teacher's nearest-prototype head (N, T) and of their ensemble (T,)."""
    blocker = space_blocker([r for r, _ in teachers], imageset)
    if blocker:
        raise UserError(blocker + ".")
    probs, yq = frozen_head_probs([m for _, m in teachers], imageset, tasks, form=form)  # (N, T, Q, way)
    return accuracies(probs, yq), accuracies(probs.mean(0), yq)


def score_teachers(teachers: Sequence[tuple[TeacherRecord, torch.nn.Module]], val: ImageSet,
                   val_tasks: Sequence[TaskIndices], test: ImageSet, test_tasks: Sequence[TaskIndices],
                   form: str = FORM) -> TeacherScores:
    """Every teacher's head and their ensemble on fixed meta-val and meta-test tasks."""
    val_each, val_ensemble = teacher_accuracies(teachers, val, val_tasks, form)
    test_each, test_ensemble = teacher_accuracies(teachers, test, test_tasks, form)
    return TeacherScores([r.name for r, _ in teachers], val_each, test_each, val_ensemble, test_ensemble, form)


def meta_val_tasks(params: Params, val: ImageSet, shot: int) -> list[TaskIndices]:
    """The fixed meta-val tasks at ``shot`` shots that meta-training selects its checkpoints on
    (its ``metatrain.val_episodes`` tasks, seed ``seed + 1``), so teachers are chosen as meta-models are."""
    return fixed_tasks(val, params.metatrain.val_episodes, params.way_test, shot, params.num_qur_test,
                       seed=params.seed + 1)


class TeacherRows:
    """The teacher rows of one column of the comparison table, scored on first use.

    Args:
        params: the column's parameters (``num_sup_test`` is the column's shot).
        project: where the pool (``models/teachers``) and meta_val are.
        test, tasks: the column's meta-test split and fixed tasks.
    """

    def __init__(self, params: Params, project: Project, test: ImageSet, tasks: Sequence[TaskIndices]):
        self.params, self.project, self.test, self.tasks = params, project, test, tasks
        self._scores: TeacherScores | str | None = None

    def scores(self) -> TeacherScores | str:
        """The teachers' scores, or why the pool cannot give them (a note for the table)."""
        if self._scores is None:
            p = self.params
            val = load_split(p.dataset, self.project.dataset(p.dataset), "meta_val")
            pool = load_pool(self.project.teachers)
            blocker = space_blocker([r for r, _ in pool], self.test)
            self._scores = blocker or score_teachers(pool, val, meta_val_tasks(p, val, p.num_sup_test),
                                                     self.test, self.tasks)
        return self._scores
