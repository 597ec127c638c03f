"""Teacher averaging: the meta-model starts as the mean of the teachers' parameters (PURER).

Only a pool whose teachers all share the meta-model's architecture and input size can be
averaged; :func:`averaging_blocker` says why another cannot, for the parameter check (from
params alone), meta-training and the comparison table (from the pool on disk).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn


def averaging_blocker(archs: Iterable[str], sizes: Iterable[int], backbone: str, size: int) -> str | None:
    """Why teachers of ``archs`` at ``sizes`` px cannot be averaged into a ``backbone`` at ``size``
    px; None when they can."""
    archs, sizes = sorted(set(archs)), sorted(set(sizes))
    if archs == [backbone] and sizes == [size]:
        return None
    return (f"teachers of architectures {archs} at {sizes} px cannot be averaged into a {backbone} "
            f"meta-model at {size} px")


def average_into(model: nn.Module, state_dicts: Sequence[dict[str, torch.Tensor]]) -> nn.Module:
    """Load the mean of ``state_dicts`` into ``model``, tensor by tensor, and return it.

    A tensor is averaged only when every teacher has it with the model's shape (the head
    is averaged when the teachers' heads have as many outputs as the meta-model's); the
    others keep the model's own initialisation.
    """
    state = model.state_dict()
    for name in state:
        stack = [sd[name] for sd in state_dicts if sd[name].shape == state[name].shape]
        if len(stack) == len(state_dicts):
            state[name] = torch.stack(stack).float().mean(0)
    model.load_state_dict(state)
    return model
