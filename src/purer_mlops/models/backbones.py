"""Backbones of teachers and meta-model, as plain ``nn.Module``s.

Every model is ``head(features(x))``: ``features`` maps images of shape (B, 3, H, W)
to embeddings of shape (B, D) and ``head`` is one ``nn.Linear(D, num_classes)``.
They hold no custom layers, so ``torch.func.functional_call`` and ``vmap`` work on
them directly (the reference's ``weight.fast`` hack is not needed).

Architectures follow CloserLookFewShot, as the PURER reference does:

- ``conv4``: 4 × [3×3 conv (32 channels, padding 1), BatchNorm, ReLU, 2×2 max-pool];
  D = 128 at 32 px, 800 at 84 px.
- ``resnet10`` / ``resnet18``: basic blocks [1,1,1,1] / [2,2,2,2], widths 64-128-256-512,
  stem = 3×3 conv stride 1 + BatchNorm, global average pool; D = 512.
- ``resnet12`` (extra): 4 residual blocks of three 3×3 convs, widths 64-160-320-640,
  each followed by a 2×2 max-pool, global average pool; D = 640.

``track_running_stats=False`` gives BatchNorm layers that always normalise with the
statistics of the current batch: the meta-model uses them (as in the reference),
teachers keep running statistics, which the inversion loss matches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .kernels import pool_relu

_FAST: ContextVar[bool] = ContextVar("fast_forward", default=False)


@contextmanager
def fast_forward(enabled: bool = True) -> Iterator[None]:
    """Inside, the meta-model runs its fast forward: same function, cheaper kernels.

    :class:`BatchStatNorm2d` calls the native ``F.batch_norm`` (one read of the activation for
    both statistics; its double backward is correct outside ``vmap``, which
    tests/test_learners.py checks with ``gradgradcheck``), and :class:`Conv4` ends each block
    with :func:`~.kernels.pool_relu` (max-pool, then ReLU: the folded teachers' block end too).
    """
    token = _FAST.set(enabled)
    try:
        yield
    finally:
        _FAST.reset(token)


class BatchStatNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with the current batch's statistics (no buffers).

    Written out in elementary ops by default (a learner that is not looped, under ``vmap``):
    under ``vmap`` the batching rule of batch norm's double backward is wrong
    (pytorch/functorch#534). Inside :func:`fast_forward` it calls ``F.batch_norm``.
    Same parameters and state dict as ``nn.BatchNorm2d(track_running_stats=False)``.
    """

    def __init__(self, channels: int):
        super().__init__(channels, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _FAST.get():
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias.view(1, -1, 1, 1)


def _bn(channels: int, track: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels) if track else BatchStatNorm2d(channels)


class Conv4(nn.Module):
    """Four conv blocks of ``width`` channels; embedding of size width·(H/16)²."""

    def __init__(self, image_size: int, width: int = 32, track_running_stats: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        # Teachers keep the reference's conv bias (so its state dicts import). The meta-model,
        # whose BatchNorm always uses batch statistics, has none: the bias would be cancelled
        # exactly, and its pure-rounding-noise gradient would make Adam random-walk it.
        bias = track_running_stats
        for _ in range(4):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1, bias=bias), _bn(width, track_running_stats),
                       nn.ReLU(), nn.MaxPool2d(2)]
            in_ch = width
        self.body = nn.Sequential(*layers, nn.Flatten())
        side = image_size
        for _ in range(4):
            side //= 2
        self.out_dim = width * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _FAST.get():
            return self.body(x)
        blocks = list(self.body)
        for conv, bn, _relu, _pool in zip(*[iter(blocks[:-1])] * 4, strict=True):
            x = pool_relu(bn(conv(x)))
        return blocks[-1](x)


class BasicBlock(nn.Module):
    """Two 3×3 convs with BatchNorm and an identity or 1×1-conv shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, track: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = _bn(out_ch, track)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = _bn(out_ch, track)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                          _bn(out_ch, track))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CloserLook ResNet: stem conv+BN, four stages of basic blocks, global average pool."""

    def __init__(self, blocks: tuple[int, int, int, int], track_running_stats: bool = True):
        super().__init__()
        widths = (64, 128, 256, 512)
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), _bn(64, track_running_stats))
        stages: list[nn.Module] = []
        in_ch = 64
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(BasicBlock(in_ch, w, stride, track_running_stats))
                in_ch = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))


class Res12Block(nn.Module):
    """Three 3×3 conv + BatchNorm (leaky ReLU between), 1×1 shortcut, then 2×2 max-pool."""

    def __init__(self, in_ch: int, out_ch: int, track: bool):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(c, out_ch, 3, 1, 1, bias=False) for c in (in_ch, out_ch, out_ch)])
        self.bns = nn.ModuleList([_bn(out_ch, track) for _ in range(3)])
        self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), _bn(out_ch, track))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for k, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            out = bn(conv(out))
            if k < 2:
                out = nn.functional.leaky_relu(out, 0.1)
        return self.pool(nn.functional.leaky_relu(out + self.shortcut(x), 0.1))


class ResNet12(nn.Module):
    """ResNet-12 of the few-shot literature (widths 64-160-320-640)."""

    def __init__(self, track_running_stats: bool = True):
        super().__init__()
        widths = (64, 160, 320, 640)
        chans = (3, *widths[:-1])
        blocks = [Res12Block(i, o, track_running_stats) for i, o in zip(chans, widths, strict=True)]
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(x))


class Classifier(nn.Module):
    """``head(features(x))``: logits of shape (B, num_classes) for images (B, 3, H, W)."""

    def __init__(self, features: nn.Module, num_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(features.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv4(image_size: int, track_running_stats: bool) -> Conv4:
    if image_size < 16:
        raise UserError(f"conv4 needs images of at least 16 px, got {image_size}.")
    return Conv4(image_size, track_running_stats=track_running_stats)


# The backbone registry: name → features(image_size, track_running_stats); every list of names derives from it.
ARCHITECTURES: dict[str, Callable[[int, bool], nn.Module]] = {
    "conv4": _conv4,
    "resnet10": lambda _size, track: ResNet((1, 1, 1, 1), track),
    "resnet18": lambda _size, track: ResNet((2, 2, 2, 2), track),
    "resnet12": lambda _size, track: ResNet12(track),
}


def build_backbone(arch: str, num_classes: int, image_size: int,
                   track_running_stats: bool = True) -> Classifier:
    """Build a classifier of architecture ``arch`` for ``image_size``-pixel RGB images."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}.")
    return Classifier(ARCHITECTURES[arch](image_size, track_running_stats), num_classes)


@contextmanager
def capture_bn_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the input of every BatchNorm layer of ``model`` during the forward passes inside.

    Yields a list that fills, in call order, with tensors of shape (B, C, H, W); the
    inversion loss compares their per-channel statistics with the running ones.
    """
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
               for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` in forward order (module registration order)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
