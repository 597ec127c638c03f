"""The teachers' scoring in the inversion loss: one frozen teacher's logits and its BatchNorm-statistics term.

The plain yardstick (:mod:`.plain_reference`, tests and benchmarks only) runs the teacher module
as it is and reduces the captured BatchNorm inputs in two passes. Here, for the same numbers:

- **Channels-last.** Images and convolution weights are channels-last (NHWC): on CPU a
  3×3 convolution at these sizes runs about twice as fast, max-pooling about ten times.
- **Folded BatchNorm (conv4).** A teacher is in eval mode, so BN(conv(x)) is one convolution
  with w' = w·s and b' = (b − μ)·s + β, s = γ/√(σ² + ε). The BN-statistics term needs the
  statistics of the BN *input* z = conv(x); with y = z·s + (β − μ·s) the folded output,
  mean(z) − μ = (mean(y) − β)/s and var(z) = var(y)/s², so one convolution serves both.
- **One-pass statistics.** Mean and variance from the sum and the sum of squares, in one
  read of the activation (the folded output is close to standardised, so E[y²] − E[y]² does
  not cancel badly); autograd differentiates it exactly.
- **Max-pool before ReLU** (equal: ReLU is monotone), so ReLU touches a quarter of the values.

Other architectures (resnet10/18/12) run their module on channels-last inputs and weights,
with the statistics of the captured BatchNorm inputs taken in one fused ``var_mean``.

``metatrain.compile`` runs the conv4 scorer under ``torch.compile`` (forward and its first-order
backward); on a 2-core CPU it gains little (docs/performance.md), so it is off by default.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..models.backbones import Classifier, Conv4, capture_bn_inputs
from ..models.kernels import at_least_fp32, batch_stats, bn_statistics_term, pool_relu

CL = torch.channels_last


def folded_conv4(x: torch.Tensor, layers: list[tuple[torch.Tensor, ...]], head: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, k) of x (n, 3, s, s) and Σ_l ‖μ_l − running_mean_l‖ + ‖σ²_l − running_var_l‖.

    ``layers`` holds :class:`FoldedConv4`'s (folded weight, folded bias, β, 1/s, running
    variance) per block, ``head`` its linear layer. A function of tensors only, so one compiled
    graph serves every teacher of a group.
    """
    x = x.contiguous(memory_format=CL)
    bn = x.new_zeros(())
    for w, b, beta, inv_s, running_var in layers:
        y = F.conv2d(x, w, b, padding=1)
        mean, var = batch_stats(y)
        # mean(z) − μ = (mean(y) − β)/s and var(z) = var(y)/s² (the module docstring)
        bn = bn_statistics_term(bn, (mean - beta) * inv_s, var * inv_s * inv_s, None, running_var)
        x = pool_relu(y)
    return F.linear(x.flatten(1), *head), bn


@functools.cache
def compiled_folded_conv4() -> Callable:
    """:func:`folded_conv4` under ``torch.compile`` (built once; compiled at its first call)."""
    return torch.compile(folded_conv4, dynamic=False)


class FoldedConv4:
    """A conv4 teacher with each BatchNorm folded into its convolution (weights channels-last).

    Args:
        model: the teacher (eval mode), a :class:`Classifier` over a :class:`Conv4`.
        compiled: score through :func:`compiled_folded_conv4` (``metatrain.compile``).
    """

    def __init__(self, model: Classifier, compiled: bool = False):
        convs = [m for m in model.features.body if isinstance(m, nn.Conv2d)]
        bns = [m for m in model.features.body if isinstance(m, nn.BatchNorm2d)]
        self.layers = []
        with torch.no_grad():
            for conv, bn in zip(convs, bns, strict=True):
                s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
                w = (conv.weight * s.view(-1, 1, 1, 1)).contiguous(memory_format=CL)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                b = (bias - bn.running_mean) * s + bn.bias
                # (folded weight, folded bias, β, 1/s, running variance)
                self.layers.append((w, b, bn.bias.clone(), 1.0 / s, bn.running_var.clone()))
            self.head = (model.head.weight.detach().clone(), model.head.bias.detach().clone())
        self.forward = compiled_folded_conv4() if compiled else folded_conv4

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (n, k) of x (n, 3, s, s) and the BN-statistics term (0-dim)."""
        return self.forward(x, self.layers, self.head)


class ModuleScorer:
    """Any teacher, run as a module on channels-last inputs and weights (statistics fused)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = {n: p.detach().contiguous(memory_format=CL) if p.dim() == 4 else p.detach()
                       for n, p in model.named_parameters()}
        self.stats = [(m.running_mean, m.running_var) for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (n, k) of x (n, 3, s, s) and the BN-statistics term (0-dim)."""
        with capture_bn_inputs(self.model) as feats:
            logits = functional_call(self.model, self.params, (x.contiguous(memory_format=CL),))
        bn = x.new_zeros(())
        for (running_mean, running_var), f in zip(self.stats, feats, strict=True):
            var, mean = torch.var_mean(at_least_fp32(f), dim=(0, 2, 3), correction=0)
            bn = bn_statistics_term(bn, mean, var, running_mean, running_var)
        return logits, bn


def scorer(model: nn.Module, compiled: bool = False) -> FoldedConv4 | ModuleScorer:
    """The scorer of a teacher: folded for conv4 (``compiled``: under ``torch.compile``),
    the module otherwise (eager: its BatchNorm inputs are captured by hooks)."""
    if isinstance(model, Classifier) and isinstance(model.features, Conv4):
        return FoldedConv4(model, compiled)
    return ModuleScorer(model)
