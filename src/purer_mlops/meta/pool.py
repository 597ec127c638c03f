"""The teacher pool as meta-training sees it: the frozen teachers, the bank's classes, the start.

The bank holds one row of images per class that some teacher knows: the union, over the
teachers, of their (dataset, meta_train class) pairs, sorted. The meta-model starts from a
seeded initialisation or, with ``average``, from the teachers' parameter average.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Params
from ..errors import UserError
from ..models.averaging import average_into, averaging_blocker
from ..models.backbones import Classifier, build_backbone
from ..models.pool_storage import load_pool
from .inversion import Teacher


@dataclass
class Pool:
    """The teachers as the inversion loss needs them, and the bank's class list."""

    teachers: list[Teacher]
    bank_classes: list[tuple[str, int]]  # (dataset, meta_train class id) of each bank row
    archs: list[str]
    image_sizes: list[int]
    state_dicts: list[dict[str, torch.Tensor]] = field(repr=False)

    def averaging_blocker(self, backbone: str, image_size: int) -> str | None:
        """Why this pool cannot be averaged into a ``backbone`` at ``image_size`` px; None if it can."""
        return averaging_blocker(self.archs, self.image_sizes, backbone, image_size)


def load_teachers(folder: Path) -> Pool:
    """Load the pool once (the reference reloaded every teacher at every iteration)."""
    entries = load_pool(folder)
    keys = sorted({(r.dataset, cid) for r, _ in entries for cid in r.class_ids})
    row = {k: i for i, k in enumerate(keys)}
    teachers = [Teacher(model=m, classes=torch.tensor([row[(r.dataset, c)] for c in r.class_ids]),
                        arch=r.arch, image_size=r.image_size, mean=tuple(r.mean), std=tuple(r.std))
                for r, m in entries]
    return Pool(teachers, keys, [r.arch for r, _ in entries], [r.image_size for r, _ in entries],
                [m.state_dict() for _, m in entries])


def init_meta_model(params: Params, pool: Pool | None, image_size: int) -> Classifier:
    """Fresh meta-model (seeded), or the teachers' parameter average when ``average`` is set."""
    torch.manual_seed(params.seed)
    model = build_backbone(params.backbone, params.way_train, image_size, track_running_stats=False)
    if not params.average or pool is None:
        return model
    blocker = pool.averaging_blocker(params.backbone, image_size)
    if blocker:
        raise UserError(f"'average' is true but {blocker}. Set average: false.")
    return average_into(model, pool.state_dicts)
