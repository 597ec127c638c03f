"""The normalisation of the user's own dataset ``folder``: declared in ``params.yaml`` (``folder.mean``,
``folder.std``) or, when left empty, computed from its meta-train images, and recorded with its
filelists (``data/folder/split/normalisation.json``, read by :func:`.registry.dataset_info`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .dataset import decode_image


def pixel_statistics(files: Sequence[Path], size: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (RGB, in [0, 1]) of the pixels of ``files``, each resized to ``size``²
    as the loader does; accumulated in float64 one image at a time."""
    total = np.zeros(3)
    squares = np.zeros(3)
    for path in files:
        x = decode_image(path, size).reshape(-1, 3).astype(np.float64) / 255.0  # (size², 3)
        total += x.sum(0)
        squares += (x * x).sum(0)
    n = len(files) * size * size
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    # a channel without variation (grey images' constant, blank sets) would divide by zero
    return [round(float(m), 6) for m in mean], [round(max(float(s), 1e-3), 6) for s in std]


def normalisation_record(root: Path, meta_train: list[tuple[str, str]], image_size: int,
                         mean: list[float], std: list[float]) -> str:
    """The JSON text of ``normalisation.json``: the image size, and ``mean``/``std`` as declared or,
    where empty, computed from the ``meta_train`` rows (file relative to ``root``, class)."""
    computed = pixel_statistics([root / f for f, _ in meta_train], image_size) if not (mean and std) else None
    record = {
        "image_size": image_size,
        "mean": [float(v) for v in mean] if mean else computed[0],
        "std": [float(v) for v in std] if std else computed[1],
        "computed": [key for key, given in (("mean", mean), ("std", std)) if not given],
    }
    return json.dumps(record, indent=2) + "\n"
