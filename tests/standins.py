"""Tiny stand-ins of the datasets, in the formats users bring (under ``data/raw/``) and in the
prepared folder form. Shared by the tests of preparation, the documented DVC flows and import.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from importlib.resources import files
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from purer_mlops.data.filelist import write_filelists
from purer_mlops.data.registry import SPLITS


def split_json(name: str) -> dict:
    """A split file packaged with purer_mlops (``splits/<name>``)."""
    return json.loads((files("purer_mlops") / "splits" / name).read_text(encoding="utf-8"))


def save_image(path: Path, color: tuple[int, int, int], size: int = 4) -> None:
    """A one-colour RGB image, PNG or JPEG by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix == ".png" else "JPEG"
    Image.new("RGB", (size, size), color).save(path, format=fmt)


def cifar_parts(per_part: int = 1, seed: int = 0) -> tuple[list[str], dict, dict]:
    """Names (a shuffled order of the 100 CIFAR-FS classes) and train/test pickle dicts."""
    split = split_json("cifar_fs_split.json")
    names = [c for s in SPLITS for c in split[s]]
    rng = np.random.default_rng(seed)
    names = [names[i] for i in rng.permutation(len(names))]
    parts = {}
    for member in ("train", "test"):
        labels = [lb for lb in range(len(names)) for _ in range(per_part)]
        labels = [labels[i] for i in rng.permutation(len(labels))]
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        parts[member] = {b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}
    return names, parts["train"], parts["test"]


def write_cifar_archive(path: Path, names: list[str], train: dict, test: dict,
                        meta: dict | None = None) -> None:
    """Write a CIFAR-100 python archive.

    The official pickles come from Python 2, whose strings load as bytes; Python 3 can only
    write that with protocol >= 3 (protocol 2 would need ``_codecs.encode``). The arrays are
    pickled through ``numpy.core.multiarray._reconstruct`` either way, as in the official files.
    """
    meta = meta if meta is not None else {b"fine_label_names": [n.encode() for n in names]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for member, obj in (("meta", meta), ("train", train), ("test", test)):
            blob = pickle.dumps(obj, protocol=4)
            info = tarfile.TarInfo(f"cifar-100-python/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def write_flowers(raw: Path, labels: np.ndarray) -> None:
    """``raw/flower/jpg/image_<k>.jpg`` and ``imagelabels.mat`` labelling image k with ``labels[k-1]``."""
    for k in range(1, labels.size + 1):
        save_image(raw / "flower" / "jpg" / f"image_{k:05d}.jpg", (k % 256, 0, 0))
    scipy.io.savemat(raw / "flower" / "imagelabels.mat", {"labels": labels.reshape(1, -1)})


def write_seed_folder(folder: Path, suffix: str, classes: int = 5, images: int = 6) -> None:
    """The seed's layout ``folder/meta_<split>/<class>/<i><suffix>``, distinct class names per split."""
    for s, split in enumerate(SPLITS):
        for c in range(classes):
            for i in range(images):
                save_image(folder / split / f"{split}_{c}" / f"{i}{suffix}", (s * 80, c * 40, i * 30))


def write_cub(folder: Path, classes: int = 20, images: int = 6) -> None:
    """``folder/images/<nnn>.<Name>/<Name>_<i>.jpg`` as in CUB_200_2011.tgz (classes 1..n)."""
    for c in range(1, classes + 1):
        name = f"{c:03d}.Bird_{c}"
        for i in range(images):
            save_image(folder / "images" / name / f"Bird_{c}_{i}.jpg", (c * 10, i * 30, 0))


def make_class_tree(dataset_root: Path, names: list[str]) -> None:
    """A tiny prepared dataset (2 images per class, every split) with its filelists."""
    for split in SPLITS:
        for name in names:
            folder = dataset_root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    write_filelists(dataset_root)
