"""Lay out the seed's real datasets, brought by the user under ``data/raw/``, in the seed's form.

Every dataset ends up as ``<out>/meta_train/<class>/<image>`` (and ``meta_val``, ``meta_test``),
the folder form the filelists and the loader read. Each dataset has a *planner* that reads and
checks the raw input and returns a layout ``{split: {class: [item, ...]}}``; one writer then
copies (or, for the CIFAR-100 archive, encodes) the items into the output folder. All checks
run before anything is written, and the writer builds the output in a temporary sibling folder,
so bad input raises :class:`UserError` and leaves no partial output.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
import warnings
import zlib
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import UserError
from ..fileio import atomic_dir, check_replaceable
from .dataset import open_image
from .registry import DATASET_FOLDER, IMAGE_SUFFIXES, SPLITS

# An item is either a file to copy (keeps its name) or a CIFAR image (H, W, 3 uint8) to encode.
Item = Path | np.ndarray
Layout = dict[str, dict[str, list[Item]]]

# The CIFAR-100 archive's two image pickles, in the order a class's images are numbered.
PARTS = ("train", "test")

def _split_file(name: str) -> dict:
    """Load one of the packaged split files (``splits/<name>``)."""
    return json.loads((files("purer_mlops") / "splits" / name).read_text(encoding="utf-8"))


def _missing(what: str, where: Path, track: Path) -> UserError:
    """The error for a raw input that is not where it must be (``track``: the folder to add)."""
    return UserError(f"{where} not found: put {what} at {where}, then `dvc add {track}`.")


def _image_files(folder: Path) -> list[Path]:
    """The sorted, non-empty image files of one class folder; UserError if it has none."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    # Names starting with "." are hidden files, e.g. macOS "._x.jpg" metadata that is no image.
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        found = "is empty" if not entries else "holds no image (.png/.jpg/.jpeg/.bmp/.webp)"
        raise UserError(
            f"class folder {folder} {found}: put the class's images in it, or remove the folder "
            "if the class does not belong to the dataset."
        )
    for image in images:
        _check_image(image)
    return images


def _check_image(path: Path) -> None:
    """Refuse a zero-byte file (a truncated download or copy), one that is no image (an HTML
    error page saved as .jpg), one cut short (a half-written JPEG) and one over the pixel bound.
    Every image is decoded once here, so that a bad one is named by `purer prepare`, not by the
    stage that first decodes it."""
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes): copy it again from the original dataset.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's warnings on odd but readable files
            with open_image(path, path) as image:
                image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path} is not an image or is cut short ({err}): replace it with the original file, or "
                        "remove it.") from err


def _class_folders(folder: Path) -> list[Path]:
    """The sorted class sub-folders of ``folder`` (stray files and hidden folders skipped)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _plan_seed_folder(root: Path) -> Layout:
    """Plan the seed's own layout ``root/{meta,mete}_<split>/<class>/<image>``, copied as is."""
    layout: Layout = {}
    for split in SPLITS:
        # The seed's README spells the folders "mete_*" in places; both spellings are accepted.
        candidates = [root / split, root / split.replace("meta_", "mete_")]
        present = [p for p in candidates if p.is_dir()]
        if not present:
            raise UserError(
                f"{root} has no {split}/ folder: it must hold meta_train/, meta_val/ and "
                "meta_test/, each with one sub-folder of images per class (the seed's layout)."
            )
        if len(present) > 1:
            raise UserError(
                f"{root} holds both {present[0].name}/ and {present[1].name}/: keep only one."
            )
        classes = _class_folders(present[0])
        if not classes:
            raise UserError(f"{present[0]} holds no class folder: put one folder per class in it.")
        layout[split] = {c.name: _image_files(c) for c in classes}
    _check_disjoint(root, layout)
    return layout


def _check_disjoint(root: Path, layout: Layout) -> None:
    """Refuse a class that sits in two splits: few-shot evaluation needs unseen classes."""
    seen: dict[str, str] = {}
    for split, classes in layout.items():
        for name in classes:
            if name in seen:
                raise UserError(
                    f"class {name!r} is in both {seen[name]} and {split} under {root}: "
                    "each class must belong to exactly one split."
                )
            seen[name] = split


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle the CIFAR-100 files, allowing only the globals a plain numpy array needs.

    The archive comes from the user, and an unrestricted unpickler runs arbitrary code.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct
        # The official files (numpy 1.x) name numpy.core; numpy >= 2 writes numpy._core.
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        found = allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return found


def _read_pickle(archive: tarfile.TarFile, member: str, path: Path) -> dict:
    """Unpickle one member of the CIFAR-100 archive (restricted to numpy arrays)."""
    try:
        data = archive.extractfile(member)
    except KeyError:
        data = None
    if data is None:
        raise UserError(
            f"{path} has no file {member}: it is not the CIFAR-100 python archive; download "
            "cifar-100-python.tar.gz (python version) again."
        )
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise UserError(
            f"{path}: {member} is not a valid CIFAR-100 pickle ({err}); only the official "
            "archive (plain numpy arrays) is accepted. Download cifar-100-python.tar.gz again."
        ) from err
    if not isinstance(obj, dict):
        raise UserError(f"{path}: {member} is not a CIFAR-100 pickle (no dict inside).")
    return obj


def _field(obj: dict, key: bytes, member: str, path: Path) -> object:
    """One entry of a CIFAR-100 pickle, or a UserError naming the missing key."""
    if key not in obj:
        raise UserError(f"{path}: {member} has no {key.decode()!r} entry; download it again.")
    return obj[key]


def _plan_cifar_archive(path: Path) -> Layout:
    """Plan CIFAR-FS from the official python archive: train+test images, split by class list."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            meta = _read_pickle(archive, "cifar-100-python/meta", path)
            parts = [_read_pickle(archive, f"cifar-100-python/{m}", path) for m in PARTS]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise UserError(
            f"{path} is corrupt or truncated ({err}): download cifar-100-python.tar.gz again."
        ) from err
    names = _field(meta, b"fine_label_names", "meta", path)
    if not isinstance(names, list) or not all(isinstance(n, bytes) for n in names):
        raise UserError(f"{path}: meta's fine_label_names is not a list of names.")
    names = [n.decode("utf-8") for n in names]
    # Gather each fine class's images, training part first, in the archive's order.
    per_class: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for member, part in zip(PARTS, parts, strict=True):
        data = _field(part, b"data", member, path)
        labels = _field(part, b"fine_labels", member, path)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32):
            raise UserError(f"{path}: {member}'s data is not an N×3072 uint8 array.")
        if not isinstance(labels, list) or len(labels) != len(data):
            raise UserError(f"{path}: {member} has {len(data)} images but not as many labels.")
        if not all(isinstance(lb, int) and 0 <= lb < len(names) for lb in labels):
            raise UserError(f"{path}: {member} has a fine label outside 0..{len(names) - 1}.")
        # Rows are channel-planar (all R, then G, then B); images are H×W×RGB.
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for image, label in zip(images, labels, strict=True):
            per_class[names[label]].append(image)
    split = _split_file("cifar_fs_split.json")
    layout: Layout = {}
    for s in SPLITS:
        absent = [c for c in split[s] if c not in per_class]
        if absent:
            raise UserError(
                f"{path} lacks the CIFAR-FS class(es) {', '.join(absent)}: it is not the "
                "CIFAR-100 archive; download cifar-100-python.tar.gz again."
            )
        empty = [c for c in split[s] if not per_class[c]]
        if empty:
            raise UserError(f"{path} has no image of class(es) {', '.join(empty)}.")
        layout[s] = {c: per_class[c] for c in sorted(split[s])}
    return layout


def _plan_cifar100(raw_root: Path) -> Layout:
    """CIFAR-FS: the seed's folder if present, else the official archive."""
    folder, archive = raw_root / "cifar100", raw_root / "cifar-100-python.tar.gz"
    if folder.is_dir():
        return _plan_seed_folder(folder)
    if archive.is_file():
        return _plan_cifar_archive(archive)
    raise UserError(
        f"no CIFAR-100 data: put cifar-100-python.tar.gz (the file torchvision downloads) at "
        f"{archive}, or the seed's cifar100/ folder at {folder}/, then `dvc add` the one "
        "you put there."
    )


def _seed_folder_planner(name: str) -> Callable[[Path], Layout]:
    """The planner of a dataset that only exists in the seed's folder form, at ``data/raw/<name>/``
    (miniImageNet, and the user's own ``folder``)."""

    def plan(raw_root: Path) -> Layout:
        folder = raw_root / name
        if not folder.is_dir():
            what = f"the seed's {name}/ folder (meta_train/meta_val/meta_test, one sub-folder of images per class)"
            raise _missing(what, folder, folder)
        return _plan_seed_folder(folder)

    return plan


def _plan_cub(raw_root: Path) -> Layout:
    """CUB-200-2011: classes sorted by name, even → train, i%4==1 → val, i%4==3 → test."""
    images = raw_root / "CUB_200_2011" / "images"
    if not images.is_dir():
        what = "the images/ folder of CUB_200_2011.tgz (one folder per class)"
        raise _missing(what, images, images.parent)
    classes = _class_folders(images)
    if not classes:
        raise UserError(f"{images} holds no class folder: extract CUB_200_2011.tgz again.")
    layout: Layout = {s: {} for s in SPLITS}
    for i, folder in enumerate(classes):
        split = "meta_train" if i % 2 == 0 else ("meta_val" if i % 4 == 1 else "meta_test")
        layout[split][folder.name] = _image_files(folder)
    return layout


def _plan_flower(raw_root: Path) -> Layout:
    """Oxford 102 Flowers: jpg/image_%05d.jpg labelled by imagelabels.mat, split by class id."""
    from scipy.io import loadmat  # scipy is slow to import; only this dataset needs it

    root = raw_root / "flower"
    jpg, mat_path = root / "jpg", root / "imagelabels.mat"
    if not jpg.is_dir():
        raise _missing("the jpg/ folder of 102flowers.tgz (image_00001.jpg ...)", jpg, root)
    if not mat_path.is_file():
        raise _missing("imagelabels.mat (the Oxford 102 Flowers labels)", mat_path, root)
    try:
        mat = loadmat(mat_path)
    except Exception as err:  # scipy raises many types (ValueError, TypeError, OSError...)
        raise UserError(
            f"{mat_path} is not a readable .mat file ({err}): download it again."
        ) from err
    if "labels" not in mat:
        raise UserError(f"{mat_path} has no 'labels' variable: it is not imagelabels.mat.")
    labels = np.asarray(mat["labels"]).ravel()
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.number) or np.any(labels % 1):
        raise UserError(f"{mat_path}: 'labels' is not a list of integer class ids.")
    split = _split_file("flower_split.json")
    known = {c for s in SPLITS for c in split[s]}
    unknown = sorted({int(lb) for lb in labels} - known)
    if unknown:
        raise UserError(
            f"{mat_path} has class id(s) {unknown[:5]} outside the 102 Flowers classes 1..102: "
            "it is not imagelabels.mat."
        )
    per_class: dict[int, list[Path]] = {c: [] for c in known}
    for k, label in enumerate(labels, start=1):
        image = jpg / f"image_{k:05d}.jpg"
        if not image.is_file():
            raise UserError(
                f"{image} not found, but {mat_path.name} labels {labels.size} images: "
                "extract 102flowers.tgz again into that folder."
            )
        _check_image(image)
        per_class[int(label)].append(image)
    layout: Layout = {}
    for s in SPLITS:
        empty = sorted(c for c in split[s] if not per_class[c])
        if empty:
            raise UserError(f"{mat_path} labels no image with class id(s) {empty}.")
        layout[s] = {f"class_{c:03d}": per_class[c] for c in sorted(split[s])}
    return layout


_PLANNERS: dict[str, Callable[[Path], Layout]] = {
    "cifar100": _plan_cifar100,
    "miniimagenet": _seed_folder_planner("miniimagenet"),
    "cub": _plan_cub,
    "flower": _plan_flower,
    "folder": _seed_folder_planner("folder"),
}


def _write_item(item: Item, class_dir: Path, index: int) -> None:
    """Copy a source file under its own name, or encode an image array as ``<index>.png``."""
    if isinstance(item, Path):
        # copyfile, not copy2: the output depends on content only, not on timestamps.
        shutil.copyfile(item, class_dir / item.name)
    else:
        Image.fromarray(item, "RGB").save(class_dir / f"{index}.png", format="PNG")


def _write_layout(layout: Layout, out_dir: Path, raw_root: Path, desc: str, progress: bool) -> dict:
    """Write a ``{split: {class: [items]}}`` layout as ``out_dir/<split>/<class>/``, atomically."""
    total = sum(len(items) for classes in layout.values() for items in classes.values())
    with atomic_dir(out_dir, DATASET_FOLDER, inputs=[raw_root]) as tmp, tqdm(
        total=total, desc=desc, unit="img", disable=not progress
    ) as bar:
        for split, classes in layout.items():
            for name, items in classes.items():
                class_dir = tmp / split / name
                class_dir.mkdir(parents=True)
                for index, item in enumerate(items):
                    _write_item(item, class_dir, index)
                    bar.update()
    return {
        "classes": {split: len(classes) for split, classes in layout.items()},
        "images": {
            split: sum(len(items) for items in classes.values())
            for split, classes in layout.items()
        },
    }


def prepare(dataset: str, raw_root: Path, out_dir: Path, *, progress: bool = True) -> dict:
    """Lay out a real dataset the user brought under ``raw_root`` in the seed's folder form.

    Args:
        dataset: ``cifar100``, ``miniimagenet``, ``cub``, ``flower`` or ``folder`` (the user's own).
        raw_root: where the user put the raw files (normally ``data/raw``).
        out_dir: the output folder; it gets ``meta_train/``, ``meta_val/`` and ``meta_test/``,
            each with one sub-folder of images per class. A previous ``out_dir`` is replaced
            only once the new one is complete.
        progress: show a progress bar.

    Returns:
        ``{"classes": {split: n}, "images": {split: n}}`` for the three splits.

    Raises:
        UserError: unknown dataset, raw input missing, corrupt or not in the expected form
            (no output is written then).
    """
    planner = _PLANNERS.get(dataset)
    if planner is None:
        raise UserError(
            f"unknown dataset {dataset!r} to prepare: choose one of {', '.join(_PLANNERS)}."
        )
    raw_root, out_dir = Path(raw_root), Path(out_dir)
    check_replaceable(out_dir, DATASET_FOLDER, inputs=[raw_root])  # before reading the raw data
    layout = planner(raw_root)
    return _write_layout(layout, out_dir, raw_root, f"preparing {dataset}", progress)
