"""The datasets this project knows: image size, normalisation, and what the user must bring.

Besides the registered datasets there is ``folder``: the user's own images in the seed's layout
under ``data/raw/folder/``. Its image size and normalisation are declared in ``params.yaml``
(``folder.*``); a normalisation left empty there is computed from the meta-train images by stage
``filelist`` and recorded with the filelists (``data/folder/split/normalisation.json``), which
:func:`dataset_info` reads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fileio import OutputFolder

SPLITS = ("meta_train", "meta_val", "meta_test")

# data/<dataset>/ as `purer prepare` replaces it: the splits, the filelists' folder and the
# .gitignore DVC writes beside its outputs. Anything else there is the user's, never deleted.
DATASET_FOLDER = OutputFolder("a dataset folder (meta_train/, meta_val/, meta_test/, split/)",
                              r"meta_(train|val|test)|split|\.gitignore")

# Only these suffixes count as images; anything else in a class folder (.DS_Store, notes) is skipped.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})

CIFAR_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one dataset.

    Attributes:
        name: the value of the ``dataset`` parameter.
        image_size: side length (pixels) images are resized to when loaded.
        mean, std: per-channel normalisation constants (RGB, in [0, 1] units).
        raw: what the user puts under ``data/raw/`` (empty for generated data).
        flip: a horizontal mirror image keeps its class (natural photos), so teacher pretraining
            may flip; not for glyphs, whose mirror images are other characters or none.
        crop_pad: pixels of padding around an image before a random crop back to
            ``image_size`` during teacher pretraining (about 1/8 of the side).
        recolour: colour carries no class information (glyphs are drawn in random colours),
            so teacher pretraining may permute the RGB channels and invert the image.
    """

    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    raw: tuple[str, ...]
    flip: bool = True
    crop_pad: int = 4
    recolour: bool = False


DATASETS: dict[str, DatasetInfo] = {
    "glyphs": DatasetInfo("glyphs", 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (), flip=False, recolour=True),
    "cifar100": DatasetInfo(
        "cifar100", 32, CIFAR_MEAN, CIFAR_STD,
        ("data/raw/cifar100/ (the seed's folder)", "or data/raw/cifar-100-python.tar.gz"),
    ),
    "miniimagenet": DatasetInfo(
        "miniimagenet", 84, IMAGENET_MEAN, IMAGENET_STD, ("data/raw/miniimagenet/ (the seed's folder)",),
        crop_pad=8,
    ),
    "cub": DatasetInfo("cub", 84, IMAGENET_MEAN, IMAGENET_STD, ("data/raw/CUB_200_2011/images/",),
                       crop_pad=8),
    "flower": DatasetInfo(
        "flower", 84, IMAGENET_MEAN, IMAGENET_STD, ("data/raw/flower/jpg/", "data/raw/flower/imagelabels.mat"),
        crop_pad=8,
    ),
    # the user's own folder: size, normalisation and recolouring are placeholders, replaced by
    # dataset_info from what filelist measured (recolour when colour carries no class); no flips
    # unless the user says they keep a class (augment.flip)
    "folder": DatasetInfo("folder", 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                          ("data/raw/folder/ (the seed's layout: meta_train/<class>/<image> ...)",),
                          flip=False, recolour=False),
}

FOLDER = "folder"
NORMALISATION_FILE = "normalisation.json"  # in data/folder/split/, beside the filelists


def dataset_info(name: str, root: Path) -> DatasetInfo:
    """The facts of dataset ``name`` laid out at ``root`` (``data/<name>``): the registry's, with, for
    ``folder``, the image size, normalisation and colour test recorded with its filelists."""
    info = DATASETS[name]
    if name != FOLDER:
        return info
    path = root / "split" / NORMALISATION_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: run `dvc repro filelist` (or `purer filelist`) with dataset: folder.")
    record = json.loads(path.read_text())
    return dataclasses.replace(info, image_size=int(record["image_size"]), mean=tuple(record["mean"]),
                               std=tuple(record["std"]), recolour=bool(record.get("recolour", False)))
