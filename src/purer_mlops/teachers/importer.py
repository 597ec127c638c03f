"""Import foreign teachers: PyTorch state dicts (``.pt``/``.pth``) plus a manifest → a pool.

The manifest (YAML or JSON) lists one entry per checkpoint::

    teachers:                      # or the list itself at the top level
      - file: cifar_0.pt           # relative to the source folder, must stay inside it
        arch: conv4                # conv4 | resnet10 | resnet18 | resnet12
        dataset: cifar100          # a dataset of the registry (gives mean/std, default size)
        classes: [apple, aquarium_fish, baby, bear, beaver]   # in the order of the logits
        image_size: 32             # optional: default from the registry
        class_ids: [0, 1, 2, 3, 4] # optional if data/<dataset>/split/meta_train.csv exists

Checkpoints are read with ``torch.load(weights_only=True)`` only: a file that needs
arbitrary unpickling (code execution) is refused, never run. A state dict may be nested
under ``state_dict`` or ``model`` and may carry DataParallel's ``module.`` prefix. It must
fit its architecture exactly (:func:`..models.pool.model_from_state_dict`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml

from ..data.filelist import read_filelist
from ..data.registry import DATASETS
from ..errors import UserError
from ..models.backbones import ARCHITECTURES
from ..models.pool import TeacherRecord, inside, model_from_state_dict, save_pool

SUFFIXES = (".pt", ".pth")
_KEYS = {"file", "arch", "dataset", "classes", "image_size", "class_ids"}


def read_manifest(manifest: Path) -> list[dict]:
    """The teacher entries of a YAML or JSON manifest (a list, or a mapping with ``teachers``)."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise UserError(f"manifest {manifest} not found.")
    try:
        doc = yaml.safe_load(manifest.read_text(encoding="utf-8"))  # JSON is YAML too
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"manifest {manifest} is not valid YAML/JSON: {err}") from err
    entries = doc.get("teachers") if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries:
        raise UserError(f"manifest {manifest}: expected a non-empty list of teachers "
                        "(or a mapping with a 'teachers' list); see docs/teachers.md.")
    for i, entry in enumerate(entries):
        where = f"manifest {manifest}, teacher {i}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: each teacher must be a mapping "
                            "(file, arch, dataset, classes).")
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}; known keys: "
                            f"{', '.join(sorted(_KEYS))}.")
        for key in ("file", "arch", "dataset", "classes"):
            if key not in entry:
                raise UserError(f"{where}: key {key!r} is missing.")
    return entries


def meta_train_classes(root: Path, dataset: str) -> list[str] | None:
    """Sorted meta_train class names of ``root/data/<dataset>``, or None without a filelist."""
    folder = Path(root) / "data" / dataset
    if not (folder / "split" / "meta_train.csv").is_file():
        return None
    return sorted({label for _, label in read_filelist(folder, "meta_train")})


def _record(entry: dict, where: str, root: Path) -> TeacherRecord:
    """Validate one manifest entry into a record (weights not read yet)."""
    arch, dataset, classes = entry["arch"], entry["dataset"], entry["classes"]
    if arch not in ARCHITECTURES:
        raise UserError(f"{where}: arch {arch!r} is unknown; choose one of: "
                        f"{', '.join(ARCHITECTURES)}.")
    if dataset not in DATASETS:
        raise UserError(f"{where}: dataset {dataset!r} is unknown; choose one of: "
                        f"{', '.join(DATASETS)}.")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{where}: 'classes' must be a non-empty list of class names.")
    if len(set(classes)) != len(classes):
        raise UserError(f"{where}: 'classes' lists a class twice.")
    info = DATASETS[dataset]
    size = entry.get("image_size", info.image_size)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"{where}: 'image_size' must be a positive whole number, got {size!r}.")
    known = meta_train_classes(root, dataset)
    ids = entry.get("class_ids")
    if ids is None:
        if known is None:
            raise UserError(f"{where}: give 'class_ids' (indices into the sorted meta_train "
                            f"classes of {dataset}), or prepare {Path(root) / 'data' / dataset} "
                            "so they can be looked up.")
        missing = [c for c in classes if c not in known]
        if missing:
            raise UserError(f"{where}: class {missing[0]!r} is not a meta_train class "
                            f"of {dataset}.")
        ids = [known.index(c) for c in classes]
    if (not isinstance(ids, list) or len(ids) != len(classes)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
        raise UserError(f"{where}: 'class_ids' must list one non-negative index per class.")
    if known is not None:
        wrong = [(c, i) for c, i in zip(classes, ids, strict=True)
                 if i >= len(known) or known[i] != c]
        if wrong:
            raise UserError(f"{where}: class_id {wrong[0][1]} is not class {wrong[0][0]!r} in the "
                            f"sorted meta_train classes of {dataset}.")
    return TeacherRecord(arch=arch, dataset=dataset, image_size=size, mean=info.mean, std=info.std,
                         classes=tuple(classes), class_ids=tuple(ids), accuracy=None)


def _reason(err: Exception) -> str:
    """The informative line of a torch.load error (not torch's advice to disable the check)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(err).splitlines()]
    detail = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else "")
    return f"{type(err).__name__}: {detail}" if detail else type(err).__name__


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain tensor state dict from ``path``.

    Unwraps a ``state_dict`` or ``model`` entry and strips a leading ``module.`` from names.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not a plain, safe state dict"
        raise UserError(f"{path} is not a plain PyTorch state dict ({_reason(err)}). Only "
                        "tensors and containers of tensors are accepted; a file that needs "
                        "arbitrary unpickling is refused, never run. Re-save it with "
                        "torch.save(model.state_dict(), path) from code you trust.") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def import_pool(source: Path, manifest: Path, out: Path,
                root: Path = Path(".")) -> list[TeacherRecord]:
    """Convert the checkpoints of ``source`` listed in ``manifest`` into a pool at ``out``.

    ``root`` is the project root, where ``data/<dataset>/split/meta_train.csv`` resolves class
    names to ``class_ids``. Everything is checked before ``out`` is replaced (atomically).
    Returns the stored records (accuracy None: unknown).
    """
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"source folder {source} not found.")
    teachers = []
    for i, entry in enumerate(read_manifest(manifest)):
        where = f"manifest {manifest}, teacher {i}"
        if not isinstance(entry["file"], str):
            raise UserError(f"{where}: 'file' must be a path string.")
        path = inside(source, entry["file"], where)
        if path.suffix not in SUFFIXES:
            raise UserError(f"{where}: {entry['file']!r} must be a .pt or .pth file.")
        if not path.is_file():
            raise UserError(f"{where}: {path} not found.")
        rec = _record(entry, where, root)
        model = model_from_state_dict(read_state_dict(path), rec.arch, rec.num_classes,
                                      rec.image_size, str(path))
        teachers.append((rec, model))
    return save_pool(out, teachers)
