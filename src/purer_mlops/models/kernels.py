"""The compute kernels of inversion, meta-learning and ICFIL, each formula once.

- :func:`bn_statistics_term`: ‖μ − μ_ref‖₂ + ‖σ² − σ²_ref‖₂ of per-channel BatchNorm-input
  statistics, added to a running total (the inversion loss against a teacher's running statistics,
  in the fused conv4 scorer and the module scorer; ICFIL against the support's);
- :func:`batch_stats`: those statistics in one pass (the fused conv4 scorer);
- :func:`total_variation` and :class:`GroupTotalVariation`: the total-variation prior of a batch and
  of a group of teachers' batches (one gradient buffer), over the same four neighbour differences;
- :func:`pool_relu` (with :func:`max_pool2`): the end of a conv4 block, in the meta-model's fast
  forward (:mod:`.backbones`) and in the teachers' folded conv4 (:mod:`purer_mlops.meta.fused`).

The meta-model's batch-statistics BatchNorm lives with the modules, in :mod:`.backbones`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is in a lower precision (bf16 autocast), as it is otherwise: the
    losses and statistics are reduced in at least float32."""
    return x if x.dtype == torch.float64 else x.float()


def bn_statistics_term(total: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, ref_mean: torch.Tensor | None,
                       ref_var: torch.Tensor) -> torch.Tensor:
    """``total`` + ‖mean − ref_mean‖₂ + ‖var − ref_var‖₂ for per-channel statistics (C,).

    ``ref_mean`` None: ``mean`` is already the difference (the folded conv4 scorer gets it so). The
    sum is taken in this order, (total + mean term) + variance term, on every path.
    """
    gap = mean if ref_mean is None else mean - ref_mean
    return total + gap.norm() + (var - ref_var).norm()


def channel_rows(y: torch.Tensor) -> torch.Tensor:
    """y (N, C, H, W) as rows (N·H·W, C): a view for channels-last y, a copy otherwise."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


class BatchStats(torch.autograd.Function):
    """Per-channel mean and (biased) variance (C,) of y (N, C, H, W) from Σy and Σy².

    The backward is one fused pass, ∂/∂y = ḡ_μ/n + 2·ḡ_σ²·(y − μ)/n, where autograd would
    take several; it is first order only (the inversion never differentiates it twice).
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = channel_rows(y)
        n = flat.shape[0]
        mean = flat.sum(0) / n
        ctx.save_for_backward(y, mean)
        return mean, (flat * flat).sum(0) / n - mean * mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean: torch.Tensor, g_var: torch.Tensor) -> torch.Tensor:
        y, mean = ctx.saved_tensors
        flat = channel_rows(y)
        a = g_var * (2.0 / flat.shape[0])
        b = g_mean / flat.shape[0] - mean * a
        n, c, h, w = y.shape  # computed on the (N·H·W, C) rows: the result is channels-last like y
        return torch.addcmul(b, flat, a).view(n, h, w, c).permute(0, 3, 1, 2)


def batch_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance (C,) of y (N, C, H, W), in one pass over y."""
    return BatchStats.apply(y)


# The four neighbour differences of total variation, as (minuend, subtrahend) slices of (..., H, W).
_TV_PAIRS = (((..., slice(None), slice(None, -1)), (..., slice(None), slice(1, None))),
             ((..., slice(None, -1), slice(None)), (..., slice(1, None), slice(None))),
             ((..., slice(1, None), slice(None, -1)), (..., slice(None, -1), slice(1, None))),
             ((..., slice(None, -1), slice(None, -1)), (..., slice(1, None), slice(1, None))))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Sum of the L2 norms of the right, down and two diagonal neighbour differences of x (B, 3, H, W)."""
    d1, d2, d3, d4 = (x[a] - x[b] for a, b in _TV_PAIRS)
    return d1.norm() + d2.norm() + d3.norm() + d4.norm()


class GroupTotalVariation(torch.autograd.Function):
    """Σ_t TV(x_t) over the teachers of a group, x (T, n, 3, H, W), TV as :func:`total_variation`.

    The backward adds each difference's D_kᵀ(D_k x/‖D_k x‖) into one gradient buffer; autograd
    would zero-fill and add a full-size tensor for each of the eight slices.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        diffs = [x[a] - x[b] for a, b in _TV_PAIRS]
        norms = [d.flatten(1).norm(dim=1) for d in diffs]  # (T,) each
        ctx.save_for_backward(*diffs, *norms)
        ctx.shape = x.shape
        return torch.stack(norms).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        diffs, norms = ctx.saved_tensors[:4], ctx.saved_tensors[4:]
        gx = diffs[0].new_zeros(ctx.shape)
        for (a, b), d, norm in zip(_TV_PAIRS, diffs, norms, strict=True):
            r = d * torch.where(norm > 0, g / norm, 0).view(-1, *[1] * (d.dim() - 1))
            gx[a] += r
            gx[b] -= r
        return gx


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """2×2 max-pool with stride 2 of x (N, C, H, W), as ``nn.MaxPool2d(2)`` computes it.

    On CPU the argmax of an NCHW x comes from the channels-last kernel (several times faster
    than the NCHW one) and the values are gathered at it, so autograd, to any order, follows
    the gather. A channels-last x (test-time adaptation) goes to that kernel directly.
    """
    if x.device.type != "cpu" or x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, 2)
    n, c, h, w = x.shape
    with torch.no_grad():
        _, idx = F.max_pool2d(x.detach().contiguous(memory_format=torch.channels_last), 2, return_indices=True)
    return x.flatten(2).gather(2, idx.contiguous().flatten(2)).view(n, c, h // 2, w // 2)


def pool_relu(y: torch.Tensor) -> torch.Tensor:
    """The end of a conv4 block on y (N, C, H, W): 2×2 max-pool (:func:`max_pool2`), then ReLU.

    Equal to ReLU then max-pool, values and gradients (ReLU is monotone), with the ReLU on a quarter
    of the values.
    """
    return F.relu(max_pool2(y))
