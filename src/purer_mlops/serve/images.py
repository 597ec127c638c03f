"""A user's few-shot task: support images per class, query images, read as the meta-model expects.

On disk (`purer adapt`) the support is ``SUPPORT/<class>/<image>`` and the query either flat
(``QUERY/<image>``) or in class folders (``QUERY/<class>/<image>``, then accuracy is known);
in memory (the MLflow model) each image is a path or the bytes of an image file. Every image
goes through :func:`~purer_mlops.data.dataset.decode_image`, the function that decoded the
meta-model's dataset (RGB, bilinear resize), then the card's normalisation.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError

from ..data.dataset import ImageSet, decode_image, open_image
from ..data.registry import IMAGE_SUFFIXES
from ..errors import UserError

# Modes whose images carry no colour: mixing them with colour images is refused (a grey query
# against colour support images is classified by its missing colour, not by its content).
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


@dataclass(frozen=True)
class Source:
    """One image: a file, or the bytes of an image file; ``name`` is how messages and the
    predictions table call it."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    def open(self) -> Path | io.BytesIO:
        return self.path if self.path is not None else io.BytesIO(self.data or b"")


@dataclass(frozen=True)
class FewShotTask:
    """Support images with their class (index into ``classes``), query images with theirs if known."""

    classes: list[str]
    support: list[Source]
    support_labels: list[int]
    query: list[Source]
    query_labels: list[int] | None = None


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (by suffix, case-insensitive), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{what} folder {path} not found: give an existing folder.")
    return path


def read_support(folder: Path) -> tuple[list[str], list[Source], list[int]]:
    """Classes (sorted folder names), support images and their class indices of ``SUPPORT/<class>/<image>``."""
    folders = class_folders(_folder(folder, "support"))
    if image_files(folder):
        raise UserError(f"support folder {folder} holds images outside class folders ({image_files(folder)[0].name}"
                        "): put each support image in the folder of its class, SUPPORT/<class>/<image>.")
    if len(folders) < 2:
        raise UserError(f"support folder {folder} has {len(folders)} class folder(s); a few-shot task needs at "
                        "least 2: add one folder per class, SUPPORT/<class>/<image>.")
    sources, labels = [], []
    for index, cls in enumerate(folders):
        files = image_files(cls)
        if not files:
            raise UserError(f"class folder {cls} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}): add its "
                            "support images, or remove the folder.")
        sources += [Source(f"{cls.name}/{f.name}", path=f) for f in files]
        labels += [index] * len(files)
    return [f.name for f in folders], sources, labels


def read_query(folder: Path, classes: list[str]) -> tuple[list[Source], list[int] | None]:
    """The query images, flat or in class folders (then with their class indices)."""
    flat, folders = image_files(_folder(folder, "query")), class_folders(folder)
    if flat and folders:
        raise UserError(f"query folder {folder} holds both images and folders ({folders[0].name}/): keep it flat, "
                        "or put every query image in the folder of its class.")
    if flat:
        return [Source(f.name, path=f) for f in flat], None
    unknown = [f.name for f in folders if f.name not in classes]
    if unknown:
        raise UserError(f"query class folder {folder / unknown[0]} is not a class of the support "
                        f"({', '.join(classes)}): rename or remove it.")
    sources, labels = [], []
    for cls in folders:
        files = image_files(cls)
        sources += [Source(f"{cls.name}/{f.name}", path=f) for f in files]
        labels += [classes.index(cls.name)] * len(files)
    if not sources:
        raise UserError(f"query folder {folder} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}): add the "
                        "images to classify.")
    return sources, labels


def read_task(support: Path, query: Path) -> FewShotTask:
    """The task of `purer adapt SUPPORT QUERY`."""
    classes, sources, labels = read_support(support)
    query_sources, query_labels = read_query(query, classes)
    return FewShotTask(classes, sources, labels, query_sources, query_labels)


def image_mode(source: Source) -> str:
    """The image's mode from its header (cheap: nothing decoded); unreadable or over
    :data:`~purer_mlops.data.dataset.MAX_IMAGE_PIXELS` → :class:`UserError`."""
    try:
        with open_image(source.open(), source.name) as im:
            return im.mode
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UserError(f"image {source.name} cannot be read ({err}): it is empty, truncated or not an "
                        "image. Remove or replace it.") from err


def check_modes(task: FewShotTask) -> None:
    """Refuse unreadable images, and grey images mixed with colour ones (both named)."""
    modes = {source.name: image_mode(source) for source in (*task.support, *task.query)}
    grey = [name for name, mode in modes.items() if mode in GREY_MODES]
    colour = [name for name, mode in modes.items() if mode not in GREY_MODES]
    if grey and colour:
        raise UserError(f"the task mixes grey images ({grey[0]}: {modes[grey[0]]}) with colour ones ({colour[0]}: "
                        f"{modes[colour[0]]}): convert them all to one mode (e.g. RGB) first.")


def check_support_classes(task: FewShotTask) -> None:
    """Refuse one image (the same bytes) given as support of two classes: the task contradicts
    itself, and the meta-model would learn both labels for it."""
    seen: dict[str, tuple[int, str]] = {}
    for source, label in zip(task.support, task.support_labels, strict=True):
        data = source.path.read_bytes() if source.path is not None else source.data or b""
        digest = hashlib.sha256(data).hexdigest()
        first = seen.setdefault(digest, (label, source.name))
        if first[0] != label:
            raise UserError(f"the same image is support of two classes, {task.classes[first[0]]} ({first[1]}) and "
                            f"{task.classes[label]} ({source.name}): keep it in one class only.")


def decode(sources: list[Source], size: int) -> torch.Tensor:
    """uint8 images (N, 3, size, size), decoded and resized as the meta-model's dataset was."""
    out = np.empty((len(sources), size, size, 3), dtype=np.uint8)
    for i, source in enumerate(sources):
        try:
            out[i] = decode_image(source.open(), size)
        except UserError as err:  # its advice (re-run `purer filelist`) is for dataset images
            raise UserError(f"image {source.name} cannot be read ({err.__cause__}): it is empty, truncated or "
                            "not an image. Remove or replace it.") from err
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def support_set(task: FewShotTask, card: dict) -> ImageSet:
    """The support as an :class:`ImageSet` normalised with the card's mean and std (it also
    normalises the query batches)."""
    images = decode(task.support, card["image_size"])
    return ImageSet(images, torch.tensor(task.support_labels, dtype=torch.int64), list(task.classes),
                    tuple(card["mean"]), tuple(card["std"]), "support")
