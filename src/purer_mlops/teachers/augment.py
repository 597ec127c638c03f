"""Training-time augmentation of teacher pretraining: padded random crops, flips, recolouring.

Done on tensors, on the device that trains, for a whole batch at once: the training images
are padded once per teacher, and each batch is one gather that crops (and mirrors) every
image at its own random offset. What a dataset allows is a property of the dataset
(:class:`..data.registry.DatasetInfo`): flips only where a mirror image keeps its class,
recolouring only where colour carries no class information; the ``augment.*`` knobs override it.
The random draws come from the caller's CPU generator, so the same seed gives the same batches
on any device, and nothing touches the global RNG.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Params
from ..data.registry import DATASETS, FOLDER

_PERMUTATIONS = torch.tensor(list(itertools.permutations(range(3))))  # (6, 3)


def augmentation_of(dataset: str, params: Params, recolour_keeps_class: bool | None = None
                    ) -> tuple[int, bool, bool]:
    """(crop padding, flip, recolour) of teacher pretraining on ``dataset``: the dataset's facts
    (the registry's; ``folder``: about 1/8 of its declared side, and ``recolour_keeps_class`` as
    its filelist measured it, ``ImageSet.recolour``), overridden by the ``augment.*`` knobs."""
    info, knobs = DATASETS[dataset], params.augment
    colour_free = info.recolour if recolour_keeps_class is None else recolour_keeps_class
    pad = knobs.crop_pad if knobs.crop_pad >= 0 else (
        max(1, params.folder.image_size // 8) if dataset == FOLDER else info.crop_pad)
    flip = info.flip if knobs.flip == "auto" else knobs.flip == "on"
    recolour = colour_free if knobs.recolour == "auto" else knobs.recolour == "on"
    return pad, flip, recolour


def augmentation_knobs(dataset: str, params: Params, recolour_keeps_class: bool | None = None) -> str:
    """The augmentation of ``dataset`` as the knobs that set it, for messages:
    ``augment.flip=off, augment.recolour=on, augment.crop_pad=4``."""
    pad, flip, recolour = augmentation_of(dataset, params, recolour_keeps_class)
    return f"augment.flip={'on' if flip else 'off'}, augment.recolour={'on' if recolour else 'off'}, " \
           f"augment.crop_pad={pad}"


@dataclass(frozen=True)
class Augmentation:
    """Random crops of ``pad``-padded images back to their size, optionally mirrored and recoloured.

    Attributes:
        pad: padding on each side, in pixels (0: no cropping).
        flip: mirror half of the images left to right.
        recolour: give each image a random RGB channel order and invert half of them.
        mean, std: the dataset's normalisation (RGB), to recolour in pixel units.
    """

    pad: int
    flip: bool
    recolour: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def for_dataset(cls, dataset: str, params: Params, mean: tuple[float, float, float],
                    std: tuple[float, float, float], recolour_keeps_class: bool | None = None) -> Augmentation:
        """The augmentation of ``dataset`` (normalised with ``mean``, ``std``): the dataset's own,
        with the ``augment.*`` knobs that are not ``auto`` overriding it."""
        pad, flip, recolour = augmentation_of(dataset, params, recolour_keeps_class)
        return cls(pad=pad, flip=flip, recolour=recolour, mean=mean, std=std)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Pad normalised training images once: (N, C, S, S) → (N, C, S + 2·pad, S + 2·pad).

        Reflection padding: a crop shows more of the image's own background rather than a
        flat border that the held-out images never have.
        """
        return F.pad(x, (self.pad,) * 4, mode="reflect") if self.pad else x

    def batch(self, padded: torch.Tensor, idx: torch.Tensor, size: int,
              generator: torch.Generator) -> torch.Tensor:
        """Augmented images ``idx`` (B,) of ``padded`` (N, C, S + 2·pad, S + 2·pad) → (B, C, S, S).

        The result is in ``channels_last`` layout (the gather yields (B, S, S, C) memory).
        """
        b = len(idx)
        offsets = torch.randint(0, 2 * self.pad + 1, (2, b, 1), generator=generator)
        ramp = torch.arange(size).view(1, size)
        rows, cols = offsets[0] + ramp, offsets[1] + ramp  # (B, S) each
        if self.flip:
            mirrored = torch.rand(b, 1, generator=generator) < 0.5
            cols = torch.where(mirrored, offsets[1] + (size - 1) - ramp, cols)
        device = padded.device
        # advanced indices around a slice put their broadcast shape (B, S, S) first: (B, S, S, C)
        out = padded[idx.view(b, 1, 1), :, rows.to(device).view(b, size, 1), cols.to(device).view(b, 1, size)]
        out = out.permute(0, 3, 1, 2)
        return self._recoloured(out, generator) if self.recolour else out

    def _recoloured(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x (B, 3, S, S), normalised → each image with a random channel order, half of them
        inverted (1 − pixel); done in pixel units, so any per-channel normalisation stays right."""
        b = len(x)
        order = _PERMUTATIONS[torch.randint(0, len(_PERMUTATIONS), (b,), generator=generator)]
        inverted = torch.rand(b, generator=generator) < 0.5
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        pixels = x * std + mean
        pixels = pixels[torch.arange(b).view(b, 1), order.to(x.device)]  # (B, 3, S, S)
        pixels = torch.where(inverted.to(x.device).view(b, 1, 1, 1), 1.0 - pixels, pixels)
        return ((pixels - mean) / std).contiguous(memory_format=torch.channels_last)
