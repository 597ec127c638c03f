"""Checkpoints of the PURER reference code (CloserLookFewShot networks): recognise and rename.

The reference's ``pretrain.py`` saves each teacher's ``state_dict()`` as ``model_<i>.pth``.
Its tensor names follow its own module tree, not ours:

conv4 (``ConvNet``)
    ``trunk.<b>`` (b = 0..3) is a block that registers its conv and BatchNorm twice: as the
    attributes ``C`` and ``BN`` and again inside its own ``trunk`` Sequential. Every conv/BN
    tensor therefore has two names, ``trunk.<b>.C.<t>`` = ``trunk.<b>.trunk.0.<t>`` and
    ``trunk.<b>.BN.<t>`` = ``trunk.<b>.trunk.1.<t>``. ``trunk.4`` is a flatten (no tensors),
    ``trunk.5`` the linear head. The forward is ours: conv (with bias), BN, ReLU, 2×2 max-pool.
ResNet10 / ResNet18 (``ResNet`` of ``SimpleBlock``)
    ``trunk.0`` stem conv and ``trunk.1`` its BatchNorm (no ReLU, as ours), ``trunk.2`` …
    ``trunk.<K+1>`` the K basic blocks (4 or 8) with ``C1, BN1, C2, BN2`` and, where the width
    changes, ``shortcut`` (1×1 conv) and ``BNshortcut``; then average pool, flatten (no tensors)
    and the head ``trunk.<K+4>``.

:func:`detect` says which layout a state dict has; :func:`to_ours` checks that every name the
reference writes is there (and that the two copies of a conv4 tensor agree) and returns the
state dict under our names, for :func:`..models.pool_storage.model_from_state_dict`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import UserError
from ..models.backbones import build_backbone

# Our ResNet block parts → the reference SimpleBlock's attribute names.
_RESNET_PARTS = {"conv1": "C1", "bn1": "BN1", "conv2": "C2", "bn2": "BN2",
                 "shortcut.0": "shortcut", "shortcut.1": "BNshortcut"}
_RESNET_BLOCKS = {"resnet10": 4, "resnet18": 8}
_CONV4_BLOCK = re.compile(r"trunk\.(\d+)\.(C|BN|trunk\.[01])\.\w+")
_RESNET_BLOCK = re.compile(r"trunk\.(\d+)\.(C1|BN1|C2|BN2|shortcut|BNshortcut)\.\w+")
_OURS = ("features.", "head.")


def _some(keys: list[str], n: int = 4) -> str:
    """Up to ``n`` names, quoted, and how many more there are."""
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def detect(state: Mapping[str, torch.Tensor], source: str) -> str | None:
    """The architecture of a reference-layout state dict, or None when the names are ours.

    Returns ``conv4``, ``resnet10`` or ``resnet18``. A state dict that mixes both naming
    schemes, or fits neither, is a :class:`UserError` naming the keys that do not fit.
    """
    keys = list(state)
    ref = [k for k in keys if k.startswith("trunk.")]
    ours = [k for k in keys if k.startswith(_OURS)]
    if ref and ours:
        raise UserError(f"{source}: ambiguous layout: it mixes our tensor names ({_some(ours, 2)}) with "
                        f"the reference code's ({_some(ref, 2)}). Re-save one model's state_dict().")
    if ours:
        return None
    if not ref:
        raise UserError(f"{source}: unknown layout: no tensor name fits ours (features.*, head.*) or the "
                        f"reference code's (trunk.*): {_some(keys)}. See docs/teachers.md.")
    conv4 = any(_CONV4_BLOCK.fullmatch(k) for k in ref)
    resnet_blocks = sorted({int(m[1]) for k in ref if (m := _RESNET_BLOCK.fullmatch(k))})
    if conv4 and resnet_blocks:
        raise UserError(f"{source}: ambiguous layout: it has the reference's conv4 blocks (trunk.<i>.C) "
                        "and ResNet blocks (trunk.<i>.C1) at once.")
    if conv4:
        return "conv4"
    if resnet_blocks:
        arch = next((a for a, n in _RESNET_BLOCKS.items() if n == len(resnet_blocks)), None)
        if arch is None:
            raise UserError(f"{source}: a reference ResNet with {len(resnet_blocks)} basic blocks "
                            f"(trunk.{resnet_blocks[0]}..{resnet_blocks[-1]}); only ResNet10 (4) and "
                            "ResNet18 (8) can be imported.")
        return arch
    raise UserError(f"{source}: unknown layout: its trunk.* names fit neither the reference's conv4 "
                    f"(trunk.<i>.C, trunk.<i>.BN) nor its ResNet (trunk.<i>.C1 …): {_some(ref)}.")


def reference_names(arch: str, key: str) -> tuple[str, ...]:
    """The names under which the reference's ``state_dict()`` holds our tensor ``key``.

    conv4 tensors have two (attribute first, then the block's Sequential); the rest one.
    """
    leaf = key.rsplit(".", 1)[1]
    if arch == "conv4":
        if key.startswith("head."):
            return (f"trunk.5.{leaf}",)
        index = int(key.split(".")[2])  # features.body.<index>.<leaf>; 4 layers per block
        block, position = divmod(index, 4)
        return (f"trunk.{block}.{('C', 'BN')[position]}.{leaf}", f"trunk.{block}.trunk.{position}.{leaf}")
    if key.startswith("head."):
        return (f"trunk.{_RESNET_BLOCKS[arch] + 4}.{leaf}",)
    if key.startswith("features.stem."):
        return (f"trunk.{key.split('.')[2]}.{leaf}",)
    m = re.fullmatch(r"features\.stages\.(\d+)\.(.+)\.\w+", key)
    assert m is not None, key  # build_backbone names every ResNet tensor stem/stages/head
    return (f"trunk.{int(m[1]) + 2}.{_RESNET_PARTS[m[2]]}.{leaf}",)


def to_ours(state: Mapping[str, torch.Tensor], arch: str, source: str) -> dict[str, torch.Tensor]:
    """Rename a reference-layout state dict of ``arch`` to our names, checking it is complete.

    Every tensor the reference saves must be present (BatchNorm's ``num_batches_tracked`` may
    be absent, as for our own files), nothing else may be, and the two names of a conv4
    tensor must hold equal values. Shapes are checked later, against the built model.
    """
    ours = build_backbone(arch, 1, 32).state_dict()  # names only: they depend on neither size
    names = {key: reference_names(arch, key) for key in ours}
    missing = [n for group in names.values() for n in group
               if n not in state and not n.endswith("num_batches_tracked")]
    if missing:
        raise UserError(f"{source}: reference {arch} layout, but {len(missing)} tensor(s) are missing: "
                        f"{_some(missing)}. Save the whole state_dict() of the trained model.")
    known = {n for group in names.values() for n in group}
    extra = [k for k in state if k not in known]
    if extra:
        raise UserError(f"{source}: reference {arch} layout, but {len(extra)} tensor(s) do not belong "
                        f"to it: {_some(extra)}. Is the architecture another one?")
    renamed = {}
    for key, group in names.items():
        present = [n for n in group if n in state]
        if not present:
            continue  # an absent num_batches_tracked
        first = state[present[0]]
        differ = [n for n in present[1:]
                  if state[n].shape != first.shape or not torch.equal(state[n], first)]
        if differ:
            raise UserError(f"{source}: ambiguous: {present[0]!r} and {differ[0]!r} name one tensor of the "
                            "reference's conv4 block but hold different values.")
        renamed[key] = first
    return renamed
