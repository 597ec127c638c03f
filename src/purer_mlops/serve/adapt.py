"""Labelling a user's few-shot task with a served model (`purer adapt`, the MLflow model): the
meta-model adapted to the task's support (here), or the teachers' ensemble (:mod:`.ensemble`,
the default), both through :func:`predict`.

The meta-model's adaptation is meta-testing's: the learner the model was meta-trained with
(:func:`~purer_mlops.models.learners.build_learner`) with the card's test-time inner loop, or
:class:`~purer_mlops.meta.icfil.ICFIL` on top of it. The meta-model's BatchNorm normalises with
the statistics of the batch it sees (as in meta-training and meta-testing), so queries go in
batches the size of a meta-test query set (the card's ``query_batch``); with more queries than
one batch holds they go in a seeded random order, so every batch mixes the classes as a
meta-test query set does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from ..config import Params
from ..errors import UserError
from ..meta.checkpoint import load_model
from ..meta.icfil import ICFIL
from ..models.backbones import Classifier
from ..models.learners import LEARNERS, MetaLearner, build_learner
from .images import FewShotTask, check_modes, check_support_classes, decode, support_set


class FewShotModel(Protocol):
    """What :func:`predict` serves: a card with the image space (``image_size``, ``mean``, ``std``),
    a ``kind`` (``meta-model``, ``teachers-ensemble``), where it runs, how many query images go
    through at once, the classes it can take, and a support → query-probabilities function."""

    card: dict
    kind: str

    @property
    def device(self) -> torch.device: ...

    @property
    def query_batch(self) -> int: ...

    def check_way(self, way: int) -> None: ...

    def predictor(self, xs: torch.Tensor, ys: torch.Tensor, way: int, icfil: Params | None
                  ) -> Callable[[torch.Tensor], torch.Tensor]: ...


@dataclass
class MetaModel:
    """A meta-model ready to adapt: the network, its card and its meta-learner."""

    model: Classifier
    card: dict
    learner: MetaLearner
    kind: str = "meta-model"

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.named_parameters()}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def query_batch(self) -> int:
        """The size of a meta-test query set: the batch statistics its BatchNorm was validated with."""
        return self.card["adaptation"]["query_batch"]

    def check_way(self, way: int) -> None:
        check_way(self.card, way)

    def predictor(self, xs: torch.Tensor, ys: torch.Tensor, way: int, icfil: Params | None
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
        """:func:`task_predictor`, with ICFIL when ``icfil`` (the params holding its knobs) is given."""
        calibrate = ICFIL(self.learner, icfil.calibration, icfil.inversion, icfil.metatest.seed) if icfil else None
        return task_predictor(self, xs, ys, way, calibrate)


def load_meta_model(stem: Path, device: torch.device | str = "cpu") -> MetaModel:
    """``<stem>.safetensors`` + ``<stem>.json``; a card without test-time settings is refused."""
    model, card = load_model(stem, device)
    adaptation = card.get("adaptation")
    if not isinstance(adaptation, dict) or "preprocessing" not in card:
        raise UserError(f"model card {stem.with_suffix('.json')} has no test-time adaptation or preprocessing "
                        "settings (it was written before `purer adapt` existed): re-run `purer metatrain` "
                        "(or `dvc repro metatrain`) to write a complete card.")
    learner = build_learner(card["meta_learner"], model, adaptation["inner_steps"], adaptation["inner_lr"])
    return MetaModel(model, card, learner)


def check_way(card: dict, way: int) -> None:
    """Refuse more classes than the head of a headed learner (MAML, ANIL) has outputs (a metric-based
    one, ProtoNet, takes any number)."""
    if LEARNERS[card["meta_learner"]].has_head and way > card["way"]:
        raise UserError(f"the support has {way} classes but the meta-model's head has {card['way']} outputs "
                        f"({card['meta_learner']}): give at most {card['way']} classes, or meta-train with "
                        f"way_train: {way}.")


def task_predictor(meta: MetaModel, xs: torch.Tensor, ys: torch.Tensor, way: int, icfil: ICFIL | None
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """query images (Q, 3, S, S) → probabilities (Q, way) of the model adapted to the support xs, ys.

    The learner adapts once; ICFIL and a learner with its own query rule (ProtoNet) are called
    per batch, as meta-testing calls them per task (ICFIL is seeded: each batch gets the same
    calibration).
    """
    learner, weights = meta.learner, meta.weights
    if icfil is not None:
        return lambda xq: icfil(weights, xs, ys, xq, way)[:, :way].softmax(1)
    if type(learner).query_logits is not MetaLearner.query_logits:
        return lambda xq: learner.query_logits(weights, xs, ys, xq, way)[:, :way].softmax(1)
    with torch.no_grad():
        adapted = learner.adapt(weights, xs, ys)
    return lambda xq: learner.logits(adapted, xq)[:, :way].softmax(1)


def batch_order(n: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """Query indices in batches of at most ``size``: in order when one batch holds them all,
    else a seeded permutation (each batch then mixes the classes)."""
    if n <= size:
        return [torch.arange(n)]
    return list(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).split(size))


@dataclass(frozen=True)
class Predictions:
    """Per-class probabilities (Q, way) of the query images, and the task they answer."""

    task: FewShotTask
    probabilities: torch.Tensor

    @property
    def predicted(self) -> list[int]:
        return self.probabilities.argmax(1).tolist()

    def accuracy(self) -> float | None:
        """Percent of query images given their class; None when the query is unlabelled."""
        labels = self.task.query_labels
        if labels is None:
            return None
        return 100.0 * sum(p == y for p, y in zip(self.predicted, labels, strict=True)) / len(labels)

    def table(self) -> dict[str, list]:
        """Columns: file, (label), predicted, then one probability column per class."""
        task = self.task
        columns: dict[str, list] = {"file": [s.name for s in task.query]}
        if task.query_labels is not None:
            columns["label"] = [task.classes[y] for y in task.query_labels]
        columns["predicted"] = [task.classes[p] for p in self.predicted]
        for c, name in enumerate(task.classes):
            columns[f"prob_{name}"] = [round(float(v), 6) for v in self.probabilities[:, c]]
        return columns


def predict(model: FewShotModel, task: FewShotTask, *, batch_size: int = 0, icfil: Params | None = None,
            progress: bool = False) -> Predictions:
    """The probabilities of every query image of the task, given its support: the meta-model
    adapted to it, or the teachers' ensemble's heads.

    ``batch_size`` 0 takes the model's ``query_batch``; ``icfil`` (the params holding the
    ``calibration``, ``inversion`` and ``metatest.seed`` knobs) turns ICFIL on (meta-model only).
    Every image is checked before any work: unreadable files, grey mixed with colour, too many
    classes, one image in two support classes.
    """
    model.check_way(len(task.classes))
    check_modes(task)
    check_support_classes(task)
    device = model.device
    support = support_set(task, model.card)
    xs = support.normalize(support.images.to(device))
    ys = support.labels.to(device)
    way = len(task.classes)
    probabilities_of = model.predictor(xs, ys, way, icfil)
    probabilities = torch.empty(len(task.query), way)
    order = batch_order(len(task.query), batch_size or model.query_batch)
    with tqdm(total=len(task.query), desc="queries", unit="img", disable=not progress, leave=False) as bar:
        for index in order:
            xq = support.normalize(decode([task.query[i] for i in index], model.card["image_size"]).to(device))
            with torch.set_grad_enabled(icfil is not None):
                probabilities[index] = probabilities_of(xq).detach().cpu()
            bar.update(len(index))
    return Predictions(task, probabilities)
