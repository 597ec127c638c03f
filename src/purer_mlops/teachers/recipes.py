"""How a teacher is trained: initialisation, optimiser and learning-rate schedule of each recipe.

``purer-mlops`` (default): PyTorch's default initialisation, a cosine decay of the learning
rate to zero over the whole run (stepped every optimiser step), with augmentation
(:mod:`.augment`). ``reference``: the PURER authors' settings: convolution weights drawn from
N(0, 2 / (k·k·out_channels)), BatchNorm scale 1 and shift 0; the learning rate multiplied by
0.2 after 1/2, 2/3 and 5/6 of the epochs (their 60 epochs: after epochs 30, 40 and 50); no
augmentation. Both use Adam for conv4 and SGD with momentum for ResNets (docs/teachers.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import Params
from ..errors import UserError

# The reference's MultiStepLR: milestones 30, 40, 50 of 60 epochs, gamma 0.2.
REFERENCE_MILESTONES = (30 / 60, 40 / 60, 50 / 60)
REFERENCE_GAMMA = 0.2
# The architectures trained with SGD (``resnet_lr``); conv4 with Adam (``conv4_lr``).
RESNETS = ("resnet10", "resnet18", "resnet12")


def reference_init(model: nn.Module) -> None:
    """Re-initialise ``model`` in place as the reference's network code does (global RNG).

    Conv weights ~ N(0, sqrt(2 / (k_h·k_w·out_channels))) (He, fan-out); BatchNorm weight 1,
    bias 0. Conv biases and the linear head keep PyTorch's defaults, as in the reference.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()


def make_optimizer(arch: str, model: nn.Module, params: Params) -> torch.optim.Optimizer:
    """Adam at ``conv4_lr`` for conv4; SGD at ``resnet_lr`` with momentum and weight decay for ResNets;
    an architecture with no optimiser here is refused (a new backbone needs one)."""
    p = params.pretrain
    if arch == "conv4":
        return torch.optim.Adam(model.parameters(), lr=p.conv4_lr)
    if arch not in RESNETS:
        raise UserError(f"no teacher optimiser for architecture {arch!r}: add one to make_optimizer in "
                        f"teachers/recipes.py, or pretrain with pre_backbone one of conv4, {', '.join(RESNETS)}.")
    return torch.optim.SGD(model.parameters(), lr=p.resnet_lr, momentum=p.momentum,
                           weight_decay=p.weight_decay)


def lr_factor(recipe: str, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate for optimiser step ``step`` (0-based) of the run."""
    total = steps_per_epoch * epochs
    if recipe == "reference":  # stepped per epoch, like the reference's scheduler
        epoch = step // steps_per_epoch
        passed = sum(epoch >= round(m * epochs) for m in REFERENCE_MILESTONES)
        return REFERENCE_GAMMA ** passed
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def make_schedule(recipe: str, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                  epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler to step after every optimiser step (see :func:`lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(recipe, step, steps_per_epoch, epochs))
