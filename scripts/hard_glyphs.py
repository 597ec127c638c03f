"""A harder glyph set for testing teacher training (docs/teachers.md, "A harder glyph set").

Glyph-FS's characters (:mod:`purer_mlops.data.glyphs`, look-alikes pruned) drawn in the faces
of this machine's fonts (``fc-list``: Liberation, DejaVu Condensed and ExtraLight, besides
matplotlib's 16), with stronger distortions than Glyph-FS: shear, wider rotation, blur, more
pixel noise, and colour gradients in the background and the ink; few images per class. Only
characters that every face draws are kept. Laid out as the seed's folders
``<out>/meta_train|meta_val|meta_test/<class>/NNNN.png`` (64 / 16 / 20 classes).

    python scripts/hard_glyphs.py data/raw/hardglyphs --images-per-class 60 --seed 0

Each image is a function of (seed, code point, index), so the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from purer_mlops.data import glyphs

SHEAR = 0.35  # largest horizontal shear (x shift per unit of y)
ROTATION_DEG = 22.0
BLUR_RADIUS = (0.0, 1.6)  # Gaussian blur at the 64 px canvas
NOISE_SIGMA = (6.0, 24.0)  # pixel noise, 0-255 units
EXTENT_RANGE = (0.40, 0.85)


def system_faces() -> tuple[str, ...]:
    """TrueType faces of this machine (fc-list) plus matplotlib's, sorted, drawing every class."""
    try:
        listed = subprocess.run(["fc-list", ":", "file"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:  # no fontconfig: matplotlib's faces alone
        listed = ""
    files = {line.split(":")[0].strip() for line in listed.splitlines() if line.strip().endswith(":")}
    files |= set(glyphs.font_paths())
    return tuple(sorted(f for f in files if f.endswith(".ttf") and "Math" not in f))


def shared_classes(faces: tuple[str, ...], seed: int) -> dict[str, list[int]]:
    """Glyph-FS's distinct characters that every face maps, 100 drawn with ``seed`` and split."""
    from fontTools.ttLib import TTFont

    kept, _ = glyphs.distinct_code_points()
    for face in faces:
        cmap = TTFont(face, lazy=True).getBestCmap()
        kept = [cp for cp in kept if cp in cmap]
    rng = np.random.default_rng([seed, 0x68617264])
    order = rng.permutation(len(kept))
    out, start = {}, 0
    for split, size in glyphs.SPLIT_SIZES.items():
        out[split] = sorted(kept[i] for i in order[start:start + size])
        start += size
    return out


def _gradient(rng: np.random.Generator) -> np.ndarray:
    """A (64, 64, 3) linear gradient between two random colours in a random direction."""
    a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:glyphs.CANVAS, 0:glyphs.CANVAS] / (glyphs.CANVAS - 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    return a + t[:, :, None] * (b - a)


def render(face: str, code_point: int, rng: np.random.Generator) -> np.ndarray:
    """One (32, 32, 3) uint8 image of ``code_point`` in ``face``."""
    mask = glyphs._glyph_mask(face, code_point)
    scale = rng.uniform(*EXTENT_RANGE) * glyphs.CANVAS / max(mask.size)
    glyph = mask.resize((max(1, round(mask.size[0] * scale)), max(1, round(mask.size[1] * scale))), Image.LANCZOS)
    shear = rng.uniform(-SHEAR, SHEAR)
    w, h = glyph.size
    glyph = glyph.transform((w + int(abs(shear) * h) + 1, h), Image.AFFINE,
                            (1, shear, -abs(shear) * h if shear > 0 else 0, 0, 1, 0), Image.BICUBIC)
    glyph = glyph.rotate(rng.uniform(-ROTATION_DEG, ROTATION_DEG), Image.BICUBIC, expand=True)
    if max(glyph.size) > glyphs.CANVAS:
        fit = glyphs.CANVAS / max(glyph.size)
        glyph = glyph.resize((max(1, int(glyph.size[0] * fit)), max(1, int(glyph.size[1] * fit))), Image.LANCZOS)
    glyph = glyph.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR_RADIUS)))
    alpha = np.zeros((glyphs.CANVAS, glyphs.CANVAS))
    x = int(rng.integers(0, glyphs.CANVAS - glyph.size[0] + 1))
    y = int(rng.integers(0, glyphs.CANVAS - glyph.size[1] + 1))
    alpha[y:y + glyph.size[1], x:x + glyph.size[0]] = np.asarray(glyph) / 255.0
    while True:  # ink and background gradients whose mean luminances differ enough to read
        bg, fg = _gradient(rng), _gradient(rng)
        if abs(float(((fg - bg) @ glyphs._LUMA).mean())) >= 0.3 * 255:
            break
    img = bg + alpha[:, :, None] * (fg - bg)
    img = img.reshape(glyphs.IMAGE_SIZE, 2, glyphs.IMAGE_SIZE, 2, 3).mean(axis=(1, 3))
    img += rng.normal(0.0, rng.uniform(*NOISE_SIGMA), size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images-per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    faces = system_faces()
    splits = shared_classes(faces, args.seed)
    for split, code_points in splits.items():
        for cp in code_points:
            folder = args.out / split / glyphs.class_name(cp)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(args.images_per_class):
                rng = np.random.default_rng([args.seed, cp, i])
                face = faces[int(rng.integers(len(faces)))]
                Image.fromarray(render(face, cp, rng), "RGB").save(folder / f"{i:04d}.png", compress_level=6)
    print(f"{len(faces)} faces; classes {', '.join(f'{s} {len(c)}' for s, c in splits.items())}; "
          f"{args.images_per_class} images per class in {args.out}")


if __name__ == "__main__":
    main()
