"""In-memory image sets, episode sampling and the class views teacher pretraining uses.

Every image of a split is decoded once into one uint8 tensor of shape (N, 3, S, S);
normalisation to float happens per batch, on the device that consumes it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .filelist import filelist_path, read_filelist
from .registry import dataset_info

# The most pixels an image may have: its header is read first and a larger image is refused
# before it is decoded, so one small file (a 90 KB PNG can say 20000 x 20000) cannot take
# gigabytes of memory. 50 megapixels holds any camera photo of today; the meta-model sees
# images of tens of pixels.
MAX_IMAGE_PIXELS = 50_000_000


def _too_large(name: object, pixels: str) -> UserError:
    return UserError(f"image {name} is {pixels} pixels, over the {MAX_IMAGE_PIXELS // 1_000_000} megapixels purer "
                     "decodes: downscale it (a few hundred pixels a side is plenty).")


@contextmanager
def open_image(file: Path | BinaryIO, name: object) -> Iterator[Image.Image]:
    """``Image.open`` of an image (nothing decoded yet) that is refused, as a :class:`UserError`
    naming it, when its header says more than :data:`MAX_IMAGE_PIXELS` pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our bound is lower than PIL's
            with Image.open(file) as im:
                if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
                    raise _too_large(name, f"{im.size[0]}x{im.size[1]}")
                yield im
    except Image.DecompressionBombError as err:  # PIL refuses at twice its own bound, before we see a size
        raise _too_large(name, f"more than {2 * Image.MAX_IMAGE_PIXELS // 1_000_000} million") from err


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode one image to RGB uint8 of shape (size, size, 3), resized bilinearly if needed.

    Grayscale, RGBA, palette and 16-bit images are converted, not refused.
    A missing, empty, truncated or non-image file, or one over :data:`MAX_IMAGE_PIXELS`, is a
    :class:`UserError` naming it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_image(path, path) as im:
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    # 16-bit (or 32-bit int) grey: scale to 8 bits before the RGB conversion.
                    arr = np.asarray(im, dtype=np.float64)
                    peak = 65535.0 if im.mode.startswith("I;16") else max(arr.max(), 1.0)
                    im = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8))
                rgb = im.convert("RGB")
    except FileNotFoundError as err:
        raise UserError(f"image {path} is missing: re-run `purer filelist`, or restore the file.") from err
    except (OSError, ValueError) as err:
        raise UserError(f"image {path} cannot be read ({err}): it is empty, truncated or not an image. "
                        "Remove or replace it, then re-run `purer filelist`.") from err
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


@dataclass
class ImageSet:
    """All images of one split, decoded.

    Attributes:
        images: uint8 tensor of shape (N, 3, S, S).
        labels: int64 tensor of shape (N,), indices into ``classes``.
        classes: class names, sorted.
        mean, std: normalisation constants of the dataset (RGB).
        name: ``<dataset>/<split>``.
        source: the filelist the images were listed in (image i on its line i + 2), if any.
        recolour: recolouring keeps a class (colour carries no class information: the dataset's
            fact, ``DatasetInfo.recolour``, measured for ``folder``), which teacher pretraining uses.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    source: Path | None = None
    recolour: bool = False

    def __post_init__(self) -> None:
        order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=len(self.classes))
        # by_class[c] = indices of the images of class c
        self.by_class: list[torch.Tensor] = list(torch.split(order, counts.tolist()))

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def min_per_class(self) -> int:
        return int(min(len(ix) for ix in self.by_class))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (..., 3, S, S) → float32, normalised with this dataset's mean and std."""
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        return (x.float() / 255.0 - mean) / std

    def check_task_shape(self, way: int, shot: int, query: int, keys: tuple[str, str, str]) -> None:
        """Refuse a task the split cannot supply, naming the parameters to change."""
        if way > len(self.classes):
            raise UserError(f"'{keys[0]}' is {way} but {self.name} has only {len(self.classes)} classes; "
                            f"lower '{keys[0]}'.")
        if shot + query > self.min_per_class():
            smallest = min(range(len(self.classes)), key=lambda c: len(self.by_class[c]))
            raise UserError(f"'{keys[1]}' + '{keys[2]}' = {shot + query} images per class, but class "
                            f"{self.classes[smallest]!r} of {self.name} holds only {self.min_per_class()}"
                            f"{self._where(smallest)}; lower them, or give that class more images.")

    def _where(self, c: int) -> str:
        """`` (<filelist>, line(s) N, …)``: where the images of class ``c`` are listed."""
        if self.source is None:
            return ""
        lines = sorted(int(i) + 2 for i in self.by_class[c])  # row i is on line i + 2 (after the header)
        shown = ", ".join(map(str, lines[:5])) + (", …" if len(lines) > 5 else "")
        return f" ({self.source}, line{'s' if len(lines) > 1 else ''} {shown})"


def load_split(dataset: str, root: Path, split: str, progress: bool = False) -> ImageSet:
    """Decode every image listed in ``root/split/<split>.csv`` into an :class:`ImageSet`."""
    from tqdm import tqdm

    info = dataset_info(dataset, root)
    rows = read_filelist(root, split)
    classes = sorted({c for _, c in rows})
    index = {c: i for i, c in enumerate(classes)}
    images = np.empty((len(rows), info.image_size, info.image_size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(tqdm(rows, desc=f"decode {dataset}/{split}", disable=not progress,
                                       leave=False)):
        images[i] = decode_image(path, info.image_size)
    return ImageSet(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.tensor([index[c] for _, c in rows], dtype=torch.int64),
        classes=classes, mean=info.mean, std=info.std, name=f"{dataset}/{split}",
        source=filelist_path(root, split), recolour=info.recolour,
    )


TaskIndices = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # classes (way,), support (way, shot), query (way, query)


def sample_task_indices(by_class: Sequence[torch.Tensor], way: int, shot: int, query: int,
                        generator: torch.Generator) -> TaskIndices:
    """Pick ``way`` classes and disjoint support/query images of each.

    Returns (classes (way,), support indices (way, shot), query indices (way, query)).
    """
    classes = torch.randperm(len(by_class), generator=generator)[:way]
    sup, qry = [], []
    for c in classes.tolist():
        pool = by_class[c]
        pick = pool[torch.randperm(len(pool), generator=generator)[: shot + query]]
        sup.append(pick[:shot])
        qry.append(pick[shot:])
    return classes, torch.stack(sup), torch.stack(qry)


def fixed_tasks(imageset: ImageSet, episodes: int, way: int, shot: int, query: int,
                seed: int) -> list[TaskIndices]:
    """The same ``episodes`` task index triples for a seed, whatever method consumes them."""
    gen = torch.Generator().manual_seed(seed)
    return [sample_task_indices(imageset.by_class, way, shot, query, gen) for _ in range(episodes)]


def class_view(imageset: ImageSet, class_ids: Sequence[int], holdout: float,
               seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images of ``class_ids`` relabelled 0..len-1, split per class into train and held out.

    ``holdout`` of each class's images (at least one) are held out for model selection.
    Returns (train indices (n_train,), train labels, held-out indices (n_hold,), held-out labels).
    """
    gen = torch.Generator().manual_seed(seed)
    tr_i, tr_y, ho_i, ho_y = [], [], [], []
    for rel, c in enumerate(class_ids):
        pool = imageset.by_class[c]
        if len(pool) < 2:
            raise UserError(f"class {imageset.classes[c]!r} of {imageset.name} has {len(pool)} image; "
                            "a teacher needs at least 2 per class (train and held out).")
        perm = pool[torch.randperm(len(pool), generator=gen)]
        n_hold = max(1, round(len(pool) * holdout))
        ho_i.append(perm[:n_hold])
        tr_i.append(perm[n_hold:])
        ho_y.append(torch.full((n_hold,), rel))
        tr_y.append(torch.full((len(pool) - n_hold,), rel))
    return torch.cat(tr_i), torch.cat(tr_y), torch.cat(ho_i), torch.cat(ho_y)
