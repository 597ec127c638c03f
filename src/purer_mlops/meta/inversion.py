"""The dynamic dataset (learnable bank) and the DeepInversion-style inversion loss.

The bank holds ``synthesis_per_class`` learnable images for every class some teacher
knows, in the meta-dataset's normalised input space: a tensor of shape
(C, P, 3, S, S). Teacher i sees the slice of its classes, resized to its input size
and re-normalised to its dataset's statistics, and scores it with

    L_inv(i) = CE(M_i(J(X̂_i)), y_rel)
             + a_bn · Σ_l ( ||μ_l − running_mean_l||₂ + ||σ²_l − running_var_l||₂ )
             + a_tv · TV(J(X̂_i)) + a_l2 · ||J(X̂_i)||₂

(Yin et al., CVPR 2020, "Dreaming to Distill"). Every teacher is weighted once; the
reference's running-total bug weighted teacher i (N − i) times.

The bank is gathered once per group of teachers (same architecture, input size and
normalisation) and each teacher scored with :mod:`.fused` (BatchNorm folded into the
convolutions, channels-last; the kernels of :mod:`purer_mlops.models.kernels`). The plain
per-teacher loop with its own formulas, :class:`~.plain_reference.PlainInversionLoss`, gives the
same numbers: the yardstick of the benchmarks and equivalence tests, which only they import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import InversionParams
from ..data.registry import DatasetInfo
from ..models.kernels import GroupTotalVariation, at_least_fp32
from .fused import scorer

TERMS = ("ce", "bn", "tv", "l2")


@dataclass
class Teacher:
    """A frozen teacher and where its classes sit in the bank.

    Attributes:
        model: classifier in eval mode over ``len(classes)`` labels.
        classes: (k,) int64 bank rows of its classes, in the order of its labels.
        arch: architecture name (teachers are grouped by it for batching).
        image_size: input side length it was trained at.
        mean, std: normalisation of its training dataset.
    """

    model: nn.Module
    classes: torch.Tensor
    arch: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def jitter(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Roll the whole batch (..., H, W) by (dy, dx) pixels (the same shift for every image)."""
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def random_shift(limit: int, generator: torch.Generator) -> tuple[int, int]:
    """A jitter (dx, dy), each uniform in [−limit, limit]."""
    d = torch.randint(-limit, limit + 1, (2,), generator=generator)
    return int(d[0]), int(d[1])


class Bank(nn.Module):
    """Learnable images (C, P, 3, S, S), initialised from N(0, 1) in normalised space."""

    def __init__(self, num_classes: int, per_class: int, image_size: int, generator: torch.Generator):
        super().__init__()
        self.images = nn.Parameter(torch.randn(num_classes, per_class, 3, image_size, image_size,
                                               generator=generator))


class _Group:
    """Teachers sharing architecture, input size, label count and normalisation."""

    def __init__(self, teachers: Sequence[Teacher], members: list[int]):
        self.members = members  # indices into the pool
        self.classes = torch.stack([teachers[i].classes for i in members])  # (T, k)
        first = teachers[members[0]]
        self.image_size, self.mean, self.std = first.image_size, first.mean, first.std
        self.bn_keys = [name for name, m in first.model.named_modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.scorers: list = []  # built by InversionLoss.to

    def rows(self, use: set[int] | None) -> list[int]:
        """Positions in the group of the teachers used this update (all when ``use`` is None)."""
        return [j for j, i in enumerate(self.members) if use is None or i in use]


class InversionLoss:
    """Σ over chosen teachers of L_inv(i), with each term reported separately.

    Args:
        teachers: the pool, frozen (their parameters are not trained here).
        bank: size and normalisation of the bank's space (the meta-dataset's).
        priors: weights of the priors (``bn``, ``tv``, ``l2``) and ``bf16`` (autocast of the
            teachers' forward pass).
        compiled: the conv4 scorers run under ``torch.compile`` (``metatrain.compile``).
    """

    def __init__(self, teachers: Sequence[Teacher], bank: DatasetInfo, priors: InversionParams,
                 compiled: bool = False):
        self.teachers = list(teachers)
        for t in self.teachers:
            t.model.eval().requires_grad_(False)
        self.bank_mean = torch.tensor(bank.mean).view(3, 1, 1)
        self.bank_std = torch.tensor(bank.std).view(3, 1, 1)
        self.bank_norm = (tuple(bank.mean), tuple(bank.std))  # Python floats, compared exactly
        self.bank_size = bank.image_size
        self.weights = {"ce": 1.0, "bn": priors.bn, "tv": priors.tv, "l2": priors.l2}
        self.autocast_bf16 = priors.bf16
        self.compiled = compiled
        keys: dict[tuple, list[int]] = {}
        for i, t in enumerate(self.teachers):
            keys.setdefault((t.arch, t.image_size, len(t.classes), t.mean, t.std), []).append(i)
        self.groups = [_Group(self.teachers, m) for m in keys.values()]
        self.to(self.bank_mean.device)

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> InversionLoss:
        """Move (and with ``dtype`` convert) the teachers; their scorers are rebuilt."""
        for t in self.teachers:
            t.model.to(device=device, dtype=dtype)
            t.classes = t.classes.to(device)
        for g in self.groups:
            g.classes = g.classes.to(device)
            g.scorers = [scorer(self.teachers[i].model, self.compiled) for i in g.members]
        self.bank_mean = self.bank_mean.to(device=device, dtype=dtype)
        self.bank_std = self.bank_std.to(device=device, dtype=dtype)
        return self

    def _to_teacher_space(self, x: torch.Tensor, size: int, mean: Sequence[float],
                          std: Sequence[float]) -> torch.Tensor:
        """Bank images (..., 3, S, S) → the teacher's resolution and normalisation."""
        if size != self.bank_size:
            lead = x.shape[:-3]
            x = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=(size, size), mode="bilinear",
                              align_corners=False).reshape(*lead, 3, size, size)
        if self._renormalises(mean, std):
            t_mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
            t_std = torch.tensor(std, device=x.device, dtype=x.dtype).view(3, 1, 1)
            x = ((x * self.bank_std + self.bank_mean) - t_mean) / t_std
        return x

    def _renormalises(self, mean: Sequence[float], std: Sequence[float]) -> bool:
        """Whether a teacher's normalisation differs from the bank's (Python floats, compared exactly)."""
        return (tuple(mean), tuple(std)) != self.bank_norm

    def _autocast(self, x: torch.Tensor) -> torch.autocast:
        return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16)

    def _group_terms(self, g: _Group, rows: list[int], bank: torch.Tensor, shift: tuple[int, int],
                     y: torch.Tensor) -> torch.Tensor:
        """The four terms (4,) summed over the group's teachers at ``rows``; y (k·P,): their labels."""
        cls = g.classes if len(rows) == len(g.members) else g.classes[rows]
        x = bank[cls].flatten(1, 2)  # (T, k·P, 3, S, S): one gather for the group
        x = jitter(self._to_teacher_space(x, g.image_size, g.mean, g.std), *shift)
        ce, bn = x.new_zeros(()), x.new_zeros(())
        # channels-last once for the group: each teacher's chunk is then channels-last contiguous
        chunks = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).split(x.shape[1])
        with self._autocast(x):
            for j, xj in zip(rows, chunks, strict=True):
                logits, bn_j = g.scorers[j](xj)
                ce = ce + F.cross_entropy(at_least_fp32(logits), y)
                bn = bn + at_least_fp32(bn_j)
        return torch.stack([ce, bn, GroupTotalVariation.apply(x), x.flatten(1).norm(dim=1).sum()])

    def __call__(self, bank: torch.Tensor, shift: tuple[int, int],
                 chosen: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Weighted loss summed over teachers, and each unweighted term summed over teachers.

        Args:
            bank: (C, P, 3, S, S) bank images (live, so gradients reach them).
            shift: jitter (dx, dy) applied to every teacher's images this update.
            chosen: indices (a host tensor) of the teachers used this update; None = all.

        Returns:
            ``{"loss": weighted sum, "ce": ..., "bn": ..., "tv": ..., "l2": ...}`` (0-dim tensors).
        """
        use = None if chosen is None else set(chosen.tolist())
        sums = bank.new_zeros(len(TERMS))
        per_class = bank.shape[1]
        for g in self.groups:
            rows = g.rows(use)
            if rows:
                y = torch.arange(g.classes.shape[1], device=bank.device).repeat_interleave(per_class)
                sums = sums + self._group_terms(g, rows, bank, shift, y)
        out = {name: sums[i] for i, name in enumerate(TERMS)}
        out["loss"] = sum(self.weights[n] * out[n] for n in TERMS)
        return out
