"""Glyph-FS: a CIFAR-FS-shaped few-shot benchmark rendered from the fonts inside matplotlib.

One class is one Unicode character (a letter or a symbol); one image is that character drawn
in one of 16 faces (DejaVu Sans / Serif / Sans Mono and STIXGeneral, four styles each) at a
random size, offset and rotation, in random colours with pixel noise, as a 32x32 RGB PNG.

The tree has the same layout as CIFAR-FS::

    <root>/meta_train/u0041-latin-capital-letter-a/0000.png ...   (64 classes)
    <root>/meta_val/...                                             (16 classes)
    <root>/meta_test/...                                            (20 classes)

Output is a pure function of ``seed`` and ``images_per_class`` (for a given matplotlib font
set and Pillow build): every image draws its random numbers from its own PCG64 stream seeded
by ``(seed, code point, image index)``, and PNGs are written without metadata.

Characters that look alike (Latin ``A``, Greek ``Α``, Cyrillic ``А``; ``V`` and ``v``, which
differ only in size) are pruned before sampling; see :func:`lookalike_matrix` and
``docs/glyphs.md`` for the measure and its threshold.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
import sys
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ..children import die_with_parent
from ..errors import UserError
from ..fileio import atomic_dir
from .registry import DATASET_FOLDER

SPLIT_SIZES = {"meta_train": 64, "meta_val": 16, "meta_test": 20}

# Four styles of each family; all 16 ship in matplotlib's mpl-data/fonts/ttf.
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)

IMAGE_SIZE = 32
CANVAS = 64  # drawn at twice the size, then 2x2-averaged: anti-aliased edges
MASK_FONT_SIZE = 128  # glyph masks are rendered once this large and only ever shrunk

# Look-alike measure: binary IoU of scale-normalised renderings, max over the 16 faces.
SIGNATURE_SIZE = 32
LOOKALIKE_THRESHOLD = 0.82

# Image variation. Rotation stays under 22.5 degrees so that '+' and 'x' (45 degrees apart)
# can never be rotated onto each other.
EXTENT_RANGE = (0.45, 0.80)  # longer side of the glyph, as a fraction of the canvas
ROTATION_DEG = 20.0
MIN_CONTRAST = 0.40  # luminance difference between foreground and background, in [0, 1]
NOISE_SIGMA = (3.0, 12.0)  # per-image Gaussian pixel noise, in 0-255 units

_LUMA = np.array([0.299, 0.587, 0.114])


def font_dir() -> Path:
    """Return the folder of TrueType fonts that ships inside matplotlib."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_paths() -> tuple[str, ...]:
    """Return the 16 face files, raising :class:`UserError` if any is missing."""
    folder = font_dir()
    paths = tuple(str(folder / name) for name in FONT_FILES)
    missing = [name for name, p in zip(FONT_FILES, paths, strict=True) if not os.path.isfile(p)]
    if missing:
        raise UserError(
            f"Glyph-FS needs the fonts that ship with matplotlib, but {len(missing)} are missing "
            f"from {folder}: {', '.join(missing)}. Reinstall matplotlib "
            "(pip install --force-reinstall matplotlib)."
        )
    return paths


@functools.cache
def _font(path: str) -> ImageFont.FreeTypeFont:
    # Loading a face costs ~1 ms and every image needs one: load each once per process.
    return ImageFont.truetype(path, MASK_FONT_SIZE)


@functools.cache
def _glyph_mask(path: str, code_point: int) -> Image.Image:
    """Render one character as a tightly cropped 8-bit coverage mask (255 = ink)."""
    font = _font(path)
    ch = chr(code_point)
    left, top, right, bottom = font.getbbox(ch)
    img = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(img).text((-left, -top), ch, fill=255, font=font)
    box = img.getbbox()
    if box is None:
        raise UserError(f"font {Path(path).name} draws U+{code_point:04X} as blank")
    return img.crop(box)


@functools.cache
def _candidates(paths: tuple[str, ...]) -> tuple[int, ...]:
    """Code points that every face maps, restricted to letters and symbols without accents."""
    from fontTools.ttLib import TTFont

    shared: set[int] | None = None
    for path in paths:
        cmap = set(TTFont(path, lazy=True).getBestCmap())
        shared = cmap if shared is None else shared & cmap
    return tuple(
        cp
        for cp in sorted(shared or ())
        # Decomposable forms (accented letters, compatibility variants) are a base glyph
        # plus a mark: too close to their base at 32 px.
        if unicodedata.category(chr(cp))[0] in "LS" and not unicodedata.decomposition(chr(cp))
    )


def candidate_code_points() -> list[int]:
    """Return the candidate classes: letters and symbols present in all 16 faces."""
    return list(_candidates(font_paths()))


def _signature(path: str, code_point: int) -> np.ndarray:
    """Binarised, centred, scale-normalised rendering (SIGNATURE_SIZE^2 floats in {0, 1}).

    The glyph is cropped tight, padded to a square (aspect ratio kept) and shrunk to a fixed
    size: images use random sizes, so two glyphs that differ only in size (``V`` and ``v``,
    ``o`` and the degree sign) are as confusable as identical ones.
    """
    mask = _glyph_mask(path, code_point)
    w, h = mask.size
    side = max(w, h)
    square = Image.new("L", (side, side), 0)
    square.paste(mask, ((side - w) // 2, (side - h) // 2))
    small = np.asarray(square.resize((SIGNATURE_SIZE, SIGNATURE_SIZE), Image.BOX))
    return (small >= 128).astype(np.float32).ravel()


def lookalike_matrix(code_points: list[int]) -> np.ndarray:
    """Return the symmetric look-alike measure between all pairs of ``code_points``.

    ``m[i, j]`` is the maximum over the 16 faces of the intersection-over-union of the two
    characters' signatures (see :func:`_signature`) in that face: 1.0 when some face draws
    both identically. The diagonal is 1.
    """
    paths = font_paths()
    n = len(code_points)
    out = np.zeros((n, n), dtype=np.float32)
    for path in paths:
        sig = np.stack([_signature(path, cp) for cp in code_points])
        inter = sig @ sig.T
        ink = sig.sum(axis=1)
        union = ink[:, None] + ink[None, :] - inter
        np.maximum(out, inter / np.maximum(union, 1.0), out=out)
    return out


def lookalike(a: str, b: str) -> float:
    """Return the look-alike measure of two single characters (see :func:`lookalike_matrix`)."""
    return float(lookalike_matrix([ord(a), ord(b)])[0, 1])


@functools.cache
def _distinct(paths: tuple[str, ...]) -> tuple[tuple[int, ...], int]:
    """Prune look-alikes; return (kept code points, number removed).

    Greedy in code-point order, so Basic Latin wins over Greek and Cyrillic twins and the
    pruning does not depend on the seed.
    """
    cands = list(_candidates(paths))
    sim = lookalike_matrix(cands)
    kept: list[int] = []
    for i in range(len(cands)):
        if not kept or sim[i, kept].max() < LOOKALIKE_THRESHOLD:
            kept.append(i)
    return tuple(cands[i] for i in kept), len(cands) - len(kept)


def distinct_code_points() -> tuple[list[int], int]:
    """Return the candidates left after look-alike pruning, and how many were removed."""
    kept, removed = _distinct(font_paths())
    return list(kept), removed


def class_name(code_point: int) -> str:
    """Folder name of a class: ``u0041-latin-capital-letter-a``."""
    name = unicodedata.name(chr(code_point), "unnamed").lower()
    return f"u{code_point:04x}-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def choose_classes(seed: int) -> dict[str, list[int]]:
    """Pick 100 distinct characters with ``seed`` and split them 64 / 16 / 20."""
    kept, _ = distinct_code_points()
    total = sum(SPLIT_SIZES.values())
    if len(kept) < total:
        raise UserError(
            f"only {len(kept)} distinct characters are shared by the fonts in {font_dir()}; "
            f"Glyph-FS needs {total}. Is matplotlib's font set complete?"
        )
    rng = np.random.Generator(np.random.PCG64([seed, 0x6C797068]))
    order = rng.permutation(len(kept))[:total]
    splits: dict[str, list[int]] = {}
    start = 0
    for split, size in SPLIT_SIZES.items():
        splits[split] = sorted(kept[i] for i in order[start : start + size])
        start += size
    return splits


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # Rejection sampling keeps the colour distribution uniform apart from low-contrast pairs.
    while True:
        fg, bg = rng.integers(0, 256, size=(2, 3)).astype(np.float64)
        if abs(float(_LUMA @ (fg - bg))) >= MIN_CONTRAST * 255:
            return fg, bg


def render(code_point: int, seed: int, index: int) -> np.ndarray:
    """Render image ``index`` of class ``code_point`` as a (32, 32, 3) uint8 array.

    All randomness comes from a PCG64 stream keyed by (seed, code point, index), so any image
    can be rebuilt alone and the result does not depend on generation order.
    """
    paths = font_paths()
    rng = np.random.Generator(np.random.PCG64([seed, code_point, index]))
    mask = _glyph_mask(paths[int(rng.integers(len(paths)))], code_point)

    extent = rng.uniform(*EXTENT_RANGE) * CANVAS
    scale = extent / max(mask.size)
    size = (max(1, round(mask.size[0] * scale)), max(1, round(mask.size[1] * scale)))
    glyph = mask.resize(size, Image.LANCZOS)
    glyph = glyph.rotate(rng.uniform(-ROTATION_DEG, ROTATION_DEG), Image.BICUBIC, expand=True)
    if max(glyph.size) > CANVAS:  # a rotated wide glyph may overflow; shrink, never crop
        fit = CANVAS / max(glyph.size)
        glyph = glyph.resize(
            (max(1, int(glyph.size[0] * fit)), max(1, int(glyph.size[1] * fit))), Image.LANCZOS
        )
    x = int(rng.integers(0, CANVAS - glyph.size[0] + 1))
    y = int(rng.integers(0, CANVAS - glyph.size[1] + 1))
    alpha = np.zeros((CANVAS, CANVAS), dtype=np.float64)
    alpha[y : y + glyph.size[1], x : x + glyph.size[0]] = np.asarray(glyph) / 255.0

    fg, bg = _contrasting_colours(rng)
    img = bg + alpha[:, :, None] * (fg - bg)
    img = img.reshape(IMAGE_SIZE, 2, IMAGE_SIZE, 2, 3).mean(axis=(1, 3))
    img += rng.normal(0.0, rng.uniform(*NOISE_SIGMA), size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    # Fixed options and no text chunks: same pixels, same bytes.
    Image.fromarray(pixels, "RGB").save(path, format="PNG", compress_level=6, optimize=False)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _default_workers() -> int:
    """One process per CPU this process may use on Linux; one elsewhere (the workers are
    forked, which macOS does not make safe once torch is loaded)."""
    return len(os.sched_getaffinity(0)) if sys.platform == "linux" else 1


def _write_class(folder: Path, code_point: int, seed: int, images_per_class: int, width: int) -> None:
    """Render and write the ``images_per_class`` PNGs of one class into the new ``folder``."""
    folder.mkdir(parents=True)
    for i in range(images_per_class):
        _write_png(folder / f"{i:0{width}d}.png", render(code_point, seed, i))


def generate(
    root: Path, *, seed: int = 0, images_per_class: int = 100, progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Write Glyph-FS under ``root`` (``root/meta_train/<class>/NNNN.png``, ...).

    The tree is built in a temporary sibling folder and swapped in at the end, so ``root`` is
    either the previous tree or the complete new one. Classes are rendered by ``workers``
    processes (default: one per CPU this process may use, on Linux); every image being a function of its
    own seed, the bytes do not depend on how many.

    Returns:
        ``{"classes": {"meta_train": 64, "meta_val": 16, "meta_test": 20},
        "images_per_class": ..., "removed_lookalikes": ..., "candidates": ..., "seed": ...}``.

    Raises:
        UserError: bad ``seed`` / ``images_per_class`` / ``workers``, or matplotlib's fonts are missing.
    """
    seed = _check_int("seed", seed, 0)
    images_per_class = _check_int("images_per_class", images_per_class, 1)
    workers = _check_int("workers", _default_workers() if workers is None else workers, 1)
    paths = font_paths()
    splits = choose_classes(seed)
    _, removed = _distinct(paths)
    width = max(4, len(str(images_per_class - 1)))

    with atomic_dir(Path(root), DATASET_FOLDER) as tmp, ExitStack() as stack:
        args = [(tmp / split / class_name(cp), cp, seed, images_per_class, width)
                for split, cps in splits.items() for cp in cps]
        if workers == 1:
            written: Iterator[None] = (_write_class(*a) for a in args)
        else:
            # Forked at the first submit, before the progress bar starts its monitor thread; a
            # failure cancels the classes not yet started.
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                       initializer=die_with_parent, initargs=(os.getpid(),))
            stack.callback(pool.shutdown, cancel_futures=True)
            written = (f.result() for f in as_completed([pool.submit(_write_class, *a) for a in args]))
        for _ in tqdm(written, total=len(args), desc="Glyph-FS classes", unit="class", disable=not progress):
            pass

    return {
        "classes": {split: len(cps) for split, cps in splits.items()},
        "images_per_class": images_per_class,
        "removed_lookalikes": removed,
        "candidates": len(_candidates(paths)),
        "seed": seed,
    }


def _load_split(root: Path, split: str) -> list[np.ndarray]:
    """Load every image of ``split`` as one float array per class, shape (n, 32*32*3)."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise UserError(f"no {split}/ folder under {root}; run the Glyph-FS generator first")
    classes = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(class_dir.glob("*.png"))
        classes.append(
            np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0
                      for f in files]).reshape(len(files), -1)
        )
    return classes


def nearest_neighbour_accuracy(
    root: Path,
    split: str = "meta_test",
    way: int = 5,
    shot: int = 1,
    query: int = 15,
    episodes: int = 200,
    seed: int = 0,
) -> float:
    """Mean accuracy of pixel-space 1-nearest-neighbour over random few-shot episodes.

    Each episode samples ``way`` classes of ``split`` and ``shot + query`` images of each; a
    query is labelled with the class of the support image nearest in Euclidean distance on
    raw RGB pixels. Chance is ``1 / way``; a low score means the task needs more than
    template matching.
    """
    classes = _load_split(root, split)
    if len(classes) < way or min(len(c) for c in classes) < shot + query:
        raise UserError(
            f"{split} under {root} has too few classes or images for {way}-way {shot}-shot "
            f"episodes with {query} queries"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    correct = 0
    for _ in range(episodes):
        chosen = rng.choice(len(classes), size=way, replace=False)
        support, queries = [], []
        for c in chosen:
            picks = rng.choice(len(classes[c]), size=shot + query, replace=False)
            support.append(classes[c][picks[:shot]])
            queries.append(classes[c][picks[shot:]])
        s = np.concatenate(support)
        q = np.concatenate(queries)
        # Squared distances via |q|^2 - 2 q.s + |s|^2; the |q|^2 term does not change argmin.
        d = (s * s).sum(axis=1)[None, :] - 2.0 * q @ s.T
        predicted = np.argmin(d, axis=1) // shot
        truth = np.repeat(np.arange(way), query)
        correct += int((predicted == truth).sum())
    return correct / (episodes * way * query)
