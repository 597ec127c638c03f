"""The normalisation of the user's own dataset ``folder``: declared in ``params.yaml`` (``folder.mean``,
``folder.std``) or, when left empty, computed from its meta-train images, and recorded with its
filelists (``data/folder/split/normalisation.json``, read by :func:`.registry.dataset_info`),
together with whether its colours carry class information (:func:`colour_f_statistic`), which
decides whether teacher pretraining may recolour its images (``augment.recolour: auto``).
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


# An F statistic of the images' mean colours between classes above this: colour tells classes
# apart, so recolouring would change a class. Glyph sets drawn in random colours give 1.0–1.1
# (Glyph-FS 1.07, the hard set of scripts/hard_glyphs.py 0.90: chance); classes that differ
# in colour (a class drawn in its own colour, see tests/test_folder_dataset.py) give many times more.
COLOUR_F_LIMIT = 2.0


def colour_f_statistic(files: Sequence[Path], labels: Sequence[str], size: int) -> float:
    """One-way ANOVA F statistic of the images' mean chroma (mean RGB minus its grey level) between
    the classes ``labels``: about 1 when colour is independent of the class, large when it is not.
    One image decoded at a time (bounded memory)."""
    chroma = np.empty((len(files), 3))
    for i, path in enumerate(files):
        colour = decode_image(path, size).reshape(-1, 3).astype(np.float64).mean(0) / 255.0  # (3,)
        chroma[i] = colour - colour.mean()
    names = sorted(set(labels))
    classes = np.array([names.index(c) for c in labels])
    centre = chroma.mean(0)
    means = np.stack([chroma[classes == k].mean(0) for k in range(len(names))])  # (K, 3)
    counts = np.bincount(classes, minlength=len(names))
    between = float((counts * ((means - centre) ** 2).sum(1)).sum()) / max(len(names) - 1, 1)
    within = float(((chroma - means[classes]) ** 2).sum()) / max(len(files) - len(names), 1)
    return between / within if within > 0 else (0.0 if between == 0 else float("inf"))


def normalisation_record(root: Path, meta_train: list[tuple[str, str]], image_size: int,
                         mean: list[float], std: list[float]) -> str:
    """The JSON text of ``normalisation.json``: the image size, ``mean``/``std`` as declared or,
    where empty, computed from the ``meta_train`` rows (file relative to ``root``, class), and the
    colour test (``colour_f``; ``recolour``: true when colour carries no class information)."""
    files = [root / f for f, _ in meta_train]
    computed = pixel_statistics(files, image_size) if not (mean and std) else None
    colour_f = colour_f_statistic(files, [c for _, c in meta_train], image_size)
    record = {
        "image_size": image_size,
        "mean": [float(v) for v in mean] if mean else computed[0],
        "std": [float(v) for v in std] if std else computed[1],
        "computed": [key for key, given in (("mean", mean), ("std", std)) if not given],
        "colour_f": round(colour_f, 4),
        "recolour": colour_f < COLOUR_F_LIMIT,
    }
    return json.dumps(record, indent=2) + "\n"
