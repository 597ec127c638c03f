"""The teachers' ensemble as a few-shot classifier to serve: `purer adapt`'s default and the
logged ``teachers_ensemble`` model.

It is the ``teachers-ensemble`` row of the comparison table (:mod:`~purer_mlops.meta.baselines`)
through the same functions: every teacher of the pool embeds the support and the query (its
``features`` in eval mode, each image on its own), its nearest-prototype head
(:func:`~purer_mlops.meta.heads.ensemble_probs`, cosine form) gives the query's class
probabilities, and the ensemble is their mean over the teachers. Nothing is adapted or trained;
its cost is one forward pass per teacher and image (N teachers: N times a conv4's work, 13 on
the default pool), against the meta-model's one pass plus its inner loop.

Why it is the default: no data-free meta-model of this project reaches it on meta-val
(docs/distillation.md), and on the 600 meta-test tasks it is the strongest data-free classifier
(docs/compare.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import Params
from ..errors import UserError
from ..meta.heads import ensemble_probs, frozen_embed
from ..models.pool_storage import TeacherRecord, load_pool

KIND = "teachers-ensemble"
QUERY_BATCH = 75  # query images per forward pass; memory only: eval-mode BatchNorm sees each image alone


@dataclass
class TeachersEnsemble:
    """The pool's teachers (in eval mode) and a card saying their common image space.

    ``card`` holds ``model`` (:data:`KIND`), ``teachers`` (their names), ``image_size``,
    ``mean`` and ``std``: what :func:`~.images.support_set` reads to decode and normalise a task.
    """

    teachers: list[tuple[TeacherRecord, nn.Module]]
    card: dict
    kind: str = KIND
    query_batch: int = QUERY_BATCH

    @property
    def device(self) -> torch.device:
        return next(self.teachers[0][1].parameters()).device

    def check_way(self, way: int) -> None:
        """Any number of classes: the heads are nearest prototype."""

    def predictor(self, xs: torch.Tensor, ys: torch.Tensor, way: int, icfil: Params | None
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
        """query images (Q, 3, S, S) → probabilities (Q, way), the support xs (S, 3, S, S), ys (S,)."""
        if icfil is not None:
            raise UserError("ICFIL calibrates a meta-model's adaptation; the teachers' ensemble adapts nothing: "
                            "drop --icfil, or add --model meta-model.")
        embeds = [frozen_embed(model) for _, model in self.teachers]
        return lambda xq: ensemble_probs(embeds, xs[None], ys[None], xq[None], way)[0]


def load_ensemble(folder: Path, device: torch.device | str = "cpu") -> TeachersEnsemble:
    """The pool in ``folder`` (``pool.json`` + weights, checked as every pool is) as one classifier;
    teachers of different image sizes or normalisations are refused (one task cannot feed them all)."""
    if not (Path(folder) / "pool.json").is_file():
        raise UserError(f"teacher pool {folder} not found (no pool.json): run `dvc repro pretrain` (or `purer "
                        "pretrain`), or give the pool's folder (`purer adapt --model <folder>`).")
    pool = [(record, model.to(device).eval()) for record, model in load_pool(Path(folder), device)]
    spaces = {(r.image_size, tuple(r.mean), tuple(r.std)) for r, _ in pool}
    if len(spaces) > 1:
        raise UserError(f"the teachers of {folder} expect {len(spaces)} different image sizes or normalisations; "
                        "their ensemble needs one: serve the meta-model (--model meta-model) instead.")
    first = pool[0][0]
    card = {"model": KIND, "teachers": [r.name for r, _ in pool], "image_size": first.image_size,
            "mean": list(first.mean), "std": list(first.std)}
    return TeachersEnsemble(pool, card)
