"""The plain path's inversion terms, written out on their own: the yardstick of the fast kernels.

With ``metatrain.batching: plain`` the inversion loss scores each teacher as a module and
reduces its captured BatchNorm inputs in two passes, with its own total variation. Of
:mod:`purer_mlops.models.kernels` it uses only the precision helper, so tests/test_equivalence.py,
which compares the fast path with this one in float64, fails when a kernel is broken.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.backbones import capture_bn_inputs
from ..models.kernels import at_least_fp32


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
