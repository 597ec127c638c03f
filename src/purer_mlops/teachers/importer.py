"""Import foreign teachers: PyTorch state dicts (``.pt``/``.pth``) plus a manifest → a pool.

The manifest (YAML or JSON) lists one entry per checkpoint::

    teachers:                      # or the list itself at the top level
      - file: cifar_0.pt           # relative to the source folder, must stay inside it
        arch: conv4                # conv4 | resnet10 | resnet18 | resnet12
        dataset: cifar100          # a dataset of the registry (gives mean/std, default size)
        classes: [apple, aquarium_fish, baby, bear, beaver]   # in the order of the logits
        image_size: 32             # optional: default from the registry
        class_ids: [0, 1, 2, 3, 4] # optional if data/<dataset>/split/meta_train.csv exists

A folder of the reference code's ``model_<i>.pth`` (its SS scenario) needs no such list: a
*short manifest* ``{dataset: cifar100}`` (optionally ``class_order``), or no manifest and the
dataset's name, gives teacher *i* the reference's class block *i* (:func:`import_reference_folder`).

Checkpoints are read with ``torch.load(weights_only=True)`` only: a file that needs
arbitrary unpickling (code execution) is refused, never run. A state dict may be nested
under ``state_dict`` or ``model`` and may carry DataParallel's ``module.`` prefix. Its names
may be ours or the reference code's (:mod:`.reference_checkpoints` renames them). It must fit its
architecture exactly (:func:`..models.pool_storage.model_from_state_dict`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from ..data.filelist import read_filelist
from ..data.registry import DATASETS
from ..errors import UserError
from ..fileio import check_replaceable
from ..models.backbones import ARCHITECTURES
from ..models.pool_storage import POOL_FOLDER, TeacherRecord, inside, model_from_state_dict, save_pool
from ..paths import Project
from .reference_checkpoints import detect, to_ours

SUFFIXES = (".pt", ".pth")
_KEYS = {"file", "arch", "dataset", "classes", "image_size", "class_ids"}
_SHORT_KEYS = {"dataset", "class_order"}
# The reference's pretrain.py writes model_0.pth, model_1.pth, ... (no leading zeros).
_REFERENCE_FILE = re.compile(r"model_(0|[1-9][0-9]*)\.pth")


def _read_doc(manifest: Path) -> object:
    """The parsed YAML or JSON document of ``manifest``."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise UserError(f"manifest {manifest} not found.")
    try:
        return yaml.safe_load(manifest.read_text(encoding="utf-8"))  # JSON is YAML too
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"manifest {manifest} is not valid YAML/JSON: {err}") from err


def _is_short(doc: object) -> bool:
    """A short manifest (a mapping without ``teachers``) describes a reference folder."""
    return isinstance(doc, dict) and "teachers" not in doc


def read_manifest(manifest: Path, doc: object = None) -> list[dict]:
    """The teacher entries of a YAML or JSON manifest (a list, or a mapping with ``teachers``)."""
    doc = _read_doc(manifest) if doc is None else doc
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
    folder = Project(Path(root)).dataset(dataset)
    if not (folder / "split" / "meta_train.csv").is_file():
        return None
    return sorted({label for _, label in read_filelist(folder, "meta_train")})


def _check_dataset(dataset: object, where: str) -> None:
    if not isinstance(dataset, str) or dataset not in DATASETS:
        raise UserError(f"{where}: dataset {dataset!r} is unknown; choose one of: "
                        f"{', '.join(DATASETS)}.")


def _record(entry: dict, where: str, root: Path) -> TeacherRecord:
    """Validate one manifest entry into a record (weights not read yet)."""
    arch, dataset, classes = entry["arch"], entry["dataset"], entry["classes"]
    if arch not in ARCHITECTURES:
        raise UserError(f"{where}: arch {arch!r} is unknown; choose one of: "
                        f"{', '.join(ARCHITECTURES)}.")
    _check_dataset(dataset, where)
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


def _our_state(path: Path, arch: str, where: str) -> dict[str, torch.Tensor]:
    """The state dict of ``path`` under our names; a reference-layout file must be of ``arch``."""
    state = read_state_dict(path)
    found = detect(state, str(path))
    if found is None:
        return state
    if found != arch:
        raise UserError(f"{where}: {path} is a reference-code {found} checkpoint, but 'arch' says {arch}.")
    return to_ours(state, found, str(path))


def import_pool(source: Path, manifest: Path | None, out: Path, root: Path = Path("."),
                dataset: str | None = None) -> list[TeacherRecord]:
    """Convert the checkpoints of ``source`` into a pool at ``out``.

    With a manifest listing the teachers, each listed file is converted. With a short
    manifest (``dataset``, optional ``class_order``) or none but ``dataset``, ``source`` is a
    folder of the reference's ``model_<i>.pth`` (:func:`import_reference_folder`).
    ``root`` is the project root, where ``data/<dataset>/split/meta_train.csv`` resolves class
    names to ``class_ids``. Everything is checked before ``out`` is replaced (atomically); ``out``
    must be missing, empty or a pool, and contain neither ``source`` nor ``manifest``.
    Returns the stored records (accuracy None: unknown).
    """
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"source folder {source} not found.")
    inputs = [source] if manifest is None else [source, Path(manifest)]
    check_replaceable(out, POOL_FOLDER, inputs)  # before reading any checkpoint
    if (manifest is None) == (dataset is None):
        raise UserError("give exactly one of a manifest and (for a folder of the reference's "
                        "model_<i>.pth) a dataset, not both or neither.")
    doc = None if manifest is None else _read_doc(manifest)
    if doc is None or _is_short(doc):
        short = {"dataset": dataset} if doc is None else _read_short(doc, manifest)
        return import_reference_folder(source, out, root, short["dataset"], short.get("class_order"), inputs)
    teachers = []
    for i, entry in enumerate(read_manifest(manifest, doc)):
        where = f"manifest {manifest}, teacher {i}"
        if not isinstance(entry["file"], str):
            raise UserError(f"{where}: 'file' must be a path string.")
        path = inside(source, entry["file"], where)
        if path.suffix not in SUFFIXES:
            raise UserError(f"{where}: {entry['file']!r} must be a .pt or .pth file.")
        if not path.is_file():
            raise UserError(f"{where}: {path} not found.")
        rec = _record(entry, where, root)
        model = model_from_state_dict(_our_state(path, rec.arch, where), rec.arch, rec.num_classes,
                                      rec.image_size, str(path))
        teachers.append((rec, model))
    return save_pool(out, teachers, inputs)


def _read_short(doc: dict, manifest: Path) -> dict:
    """``{dataset, class_order}`` of a short manifest, checked."""
    where = f"manifest {manifest}"
    unknown = sorted(set(doc) - _SHORT_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}. A short manifest (a folder of the "
                        "reference's model_<i>.pth) has 'dataset' and optionally 'class_order'; a full "
                        "one lists 'teachers'. See docs/teachers.md.")
    if "dataset" not in doc:
        raise UserError(f"{where}: key 'dataset' is missing.")
    order = doc.get("class_order")
    if order is not None and (not isinstance(order, list) or not order
                              or not all(isinstance(c, str) for c in order) or len(set(order)) != len(order)):
        raise UserError(f"{where}: 'class_order' must list each meta_train class name once.")
    return doc


def reference_files(source: Path) -> list[Path]:
    """``model_0.pth`` … ``model_<N-1>.pth`` of a reference pretraining folder, in teacher order."""
    found = {int(m[1]): p for p in Path(source).iterdir()
             if (m := _REFERENCE_FILE.fullmatch(p.name)) and p.is_file()}
    if not found:
        raise UserError(f"{source} holds no model_<i>.pth: give the folder the reference's pretrain.py "
                        "wrote (pretrained/<dataset>/<arch>/meta_train/<way>way/model_try/), or a manifest "
                        "that lists the checkpoints.")
    gaps = sorted(set(range(max(found) + 1)) - set(found))
    if gaps:
        raise UserError(f"{source}: model_{gaps[0]}.pth is missing; the reference numbers its teachers "
                        f"0..{max(found)} without gaps.")
    return [found[i] for i in range(len(found))]


def reference_classes(root: Path, dataset: str, class_order: list[str] | None) -> tuple[list[str], list[int]]:
    """The classes in the reference's numbering, and each one's index among our sorted ones.

    Without ``class_order`` the reference's class k is the k-th meta_train class in sorted
    order (our filelist's); ``class_order`` gives the order of the reference's meta_train.csv.
    """
    known = meta_train_classes(root, dataset)
    if class_order is None:
        if known is None:
            raise UserError(f"{Path(root) / 'data' / dataset / 'split' / 'meta_train.csv'} not found: the "
                            "teachers' classes are its meta_train classes; run `purer prepare --dataset "
                            f"{dataset} && purer filelist --dataset {dataset}` first, or give 'class_order'.")
        return known, list(range(len(known)))
    if known is not None and sorted(class_order) != known:
        odd = sorted(set(class_order) ^ set(known))
        raise UserError(f"'class_order' must list exactly the {len(known)} meta_train classes of {dataset}; "
                        f"{odd[0]!r} is in only one of them.")
    ordered = sorted(class_order)
    return list(class_order), [ordered.index(c) for c in class_order]


def import_reference_folder(source: Path, out: Path, root: Path, dataset: str, class_order: list[str] | None = None,
                            inputs: list[Path] | None = None) -> list[TeacherRecord]:
    """Import the reference's SS pool: ``model_<i>.pth`` is the teacher of class block *i*.

    Block *i* is the reference's classes ``i·W … i·W+W−1`` (W = the checkpoints' logits, its
    ``num_class_per_task``), as its pretrain.py assigns them; see :func:`reference_classes` for
    the numbering. The last block may hold fewer than W classes: the reference still gave it W
    logits, of which the untrained surplus ones are dropped. Architectures are detected per file.
    ``inputs`` (default: ``source``) are what ``out`` must not contain.
    """
    _check_dataset(dataset, f"{source}")
    files = reference_files(source)
    names, ids = reference_classes(root, dataset, class_order)
    info = DATASETS[dataset]

    def teachers() -> Iterator[tuple[TeacherRecord, torch.nn.Module]]:
        way = None
        for i, path in enumerate(files):
            arch, state = _reference_state(path)
            rows = state["head.weight"].shape[0]
            if way is None:
                way = rows
                _check_block_count(len(files), way, len(names), dataset, source)
            if rows != way:
                raise UserError(f"{path} has {rows} logits, but {files[0].name} has {way}: the reference "
                                "gives every teacher of a pool the same number.")
            block = slice(i * way, (i + 1) * way)
            kept = len(names[block])  # the last block may be short: its surplus logits were never trained
            state["head.weight"], state["head.bias"] = state["head.weight"][:kept], state["head.bias"][:kept]
            rec = TeacherRecord(arch=arch, dataset=dataset, image_size=info.image_size, mean=info.mean,
                                std=info.std, classes=tuple(names[block]), class_ids=tuple(ids[block]))
            label = f"{path} (reference {arch} layout, tensors renamed as in docs/teachers.md)"
            yield rec, model_from_state_dict(state, arch, kept, info.image_size, label)

    return save_pool(out, teachers(), inputs or [source])


def _reference_state(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Architecture and renamed state dict of one reference-layout checkpoint."""
    state = read_state_dict(path)
    arch = detect(state, str(path))
    if arch is None:
        raise UserError(f"{path} uses our tensor names, not the reference's: import it with a "
                        "manifest that lists it (docs/teachers.md).")
    return arch, to_ours(state, arch, str(path))


def _check_block_count(files: int, way: int, classes: int, dataset: str, source: Path) -> None:
    """The reference trains ceil(classes / way) teachers; any other count is another pool."""
    expected = -(-classes // way)
    if files != expected:
        raise UserError(f"{source} holds {files} teachers of {way} classes, but the reference's blocks "
                        f"of the {classes} meta_train classes of {dataset} make {expected}: is it another "
                        "dataset's pool, or are files missing?")
