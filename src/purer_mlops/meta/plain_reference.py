"""The plain path, written out on its own: the yardstick of the fast kernels, for tests and benchmarks only.

Production code never imports this module (tests/test_layers.py fails when it does). It holds:

- :func:`plain_terms`: one teacher's inversion terms, the teacher run as a module, its captured
  BatchNorm inputs reduced in two passes, with its own total variation. Of
  :mod:`purer_mlops.models.kernels` it uses only the precision helper, so tests/test_equivalence.py,
  which compares the production path with this one in float64, fails when a kernel is broken;
- :class:`PlainInversionLoss`: the inversion loss as a loop of :func:`plain_terms` over teachers;
- :func:`plain_trainer`: a :class:`~.trainer.MetaTrainer` turned into the yardstick (that loss,
  learners on the elementary forward, one task after another, and Adam's loop of operations).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.backbones import capture_bn_inputs
from ..models.kernels import at_least_fp32
from .inversion import TERMS, InversionLoss, jitter
from .trainer import MetaTrainer


def plain_total_variation(x: torch.Tensor) -> torch.Tensor:
    """Sum of the L2 norms of the right, down and two diagonal neighbour differences of x (B, 3, H, W)."""
    d1 = x[..., :, :-1] - x[..., :, 1:]
    d2 = x[..., :-1, :] - x[..., 1:, :]
    d3 = x[..., 1:, :-1] - x[..., :-1, 1:]
    d4 = x[..., :-1, :-1] - x[..., 1:, 1:]
    return d1.norm() + d2.norm() + d3.norm() + d4.norm()


def plain_terms(model: nn.Module, x: torch.Tensor, *, bn_keys: list[str], y: torch.Tensor,
                autocast: torch.autocast) -> torch.Tensor:
    """The four unweighted terms (4,) (ce, bn, tv, l2) of one teacher on its images x (n, 3, s, s)."""
    buffers = dict(model.named_buffers())
    with capture_bn_inputs(model) as feats, autocast:
        logits = model(x)
    ce = F.cross_entropy(at_least_fp32(logits), y)
    bn = x.new_zeros(())
    for key, f in zip(bn_keys, feats, strict=True):
        f = at_least_fp32(f)
        mu = f.mean(dim=(0, 2, 3))
        var = f.var(dim=(0, 2, 3), unbiased=False)
        bn = bn + (mu - buffers[f"{key}.running_mean"]).norm() + (var - buffers[f"{key}.running_var"]).norm()
    return torch.stack([ce, bn, plain_total_variation(x), x.norm()])


class PlainInversionLoss(InversionLoss):
    """:class:`~.inversion.InversionLoss` as a per-teacher loop of :func:`plain_terms` (same arguments)."""

    def _renormalises(self, mean: Sequence[float], std: Sequence[float]) -> bool:
        # as the plain path always did: the float32 statistics never equal the Python floats
        return (tuple(mean) != tuple(self.bank_mean.flatten().tolist())
                or tuple(std) != tuple(self.bank_std.flatten().tolist()))

    def _group_terms(self, g, rows: list[int], bank: torch.Tensor, shift: tuple[int, int],
                     y: torch.Tensor) -> torch.Tensor:
        """The four terms (4,) summed over the group's teachers at ``rows``, one teacher at a time."""
        sums = bank.new_zeros(len(TERMS))
        for j in rows:
            t = self.teachers[g.members[j]]
            x = jitter(self._to_teacher_space(bank[t.classes].flatten(0, 1), t.image_size, t.mean, t.std), *shift)
            sums = sums + plain_terms(t.model, x, bn_keys=g.bn_keys, y=y, autocast=self._autocast(x))
        return sums


def plain_trainer(trainer: MetaTrainer) -> MetaTrainer:
    """``trainer``, just built, turned into the yardstick in place: :class:`PlainInversionLoss`, its
    learners on the elementary forward (the meta update runs its tasks one after another anyway),
    and both optimisers Adam's loop of operations instead of the fused kernel."""
    p = trainer.params
    if trainer.bank is not None:
        trainer.inversion = PlainInversionLoss(trainer.pool.teachers, trainer.info, p.inversion).to(trainer.device)
        trainer.bank_opt = torch.optim.Adam(trainer.bank.parameters(), lr=p.inversion.lr)
    trainer.meta_opt = torch.optim.Adam(trainer.model.parameters(), lr=p.outer_lr)
    for learner in (*trainer.learners, trainer.tester):
        learner.looped = False
    return trainer
