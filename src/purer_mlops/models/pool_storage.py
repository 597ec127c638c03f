"""The stored teacher pool: one safetensors file per teacher plus ``pool.json``.

A pool folder (``models/teachers/`` of the pipeline) holds::

    pool.json                 {"format": "purer-teacher-pool", "version": 1, "teachers": [...]}
    teacher_000.safetensors   state dict of teacher 0 (parameters and BatchNorm buffers)
    teacher_001.safetensors
    ...

Each entry of ``teachers`` is a :class:`TeacherRecord`. Loading treats every byte of the
folder as untrusted input: paths must stay inside the folder, the SHA-256 must match,
weights are parsed by safetensors (never unpickled), and every tensor must have the name
and shape the named architecture expects (:func:`model_from_state_dict`, shared with the
importer of foreign checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ..errors import UserError
from ..fileio import OutputFolder, atomic_dir
from .backbones import ARCHITECTURES, Classifier, build_backbone

POOL_FORMAT = "purer-teacher-pool"
POOL_VERSION = 1
# The largest image side a teacher or meta-model may declare (CIFAR 32, miniImageNet 84, CUB and
# Flowers 84 here; ResNets trained at 224 fit): a larger one in a hand-edited file would make
# every decode and forward pass huge.
MAX_IMAGE_SIZE = 512
POOL_FILE = "pool.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
POOL_FOLDER = OutputFolder("a teacher pool (pool.json, teacher_*.safetensors)", r"pool\.json|teacher_\d+\.safetensors")


@dataclass(frozen=True)
class TeacherRecord:
    """What the pool knows about one teacher.

    Attributes:
        arch: ``conv4`` | ``resnet10`` | ``resnet18`` | ``resnet12``.
        dataset: dataset the teacher was trained on (a key of the registry).
        image_size: side length of its input images (B, 3, image_size, image_size).
        mean, std: RGB normalisation of its inputs.
        classes: class names, in the order of its output logits (len = number of logits).
        class_ids: indices of ``classes`` in the sorted meta_train class list of ``dataset``.
        accuracy: held-out accuracy in percent; None when unknown (imported teachers).
        name: ``teacher_000``, ...; assigned by :func:`save_pool`.
        file: weights file relative to the pool folder; assigned by :func:`save_pool`.
        sha256: hex digest of that file; assigned by :func:`save_pool`.
    """

    arch: str
    dataset: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...]
    class_ids: tuple[int, ...]
    accuracy: float | None = None
    name: str = ""
    file: str = ""
    sha256: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _shape(t: torch.Tensor | torch.Size) -> str:
    dims = t.shape if isinstance(t, torch.Tensor) else t
    return "(" + ", ".join(str(int(s)) for s in dims) + ")"


def model_from_state_dict(state: Mapping[str, torch.Tensor], arch: str, num_classes: int,
                          image_size: int, source: str) -> Classifier:
    """Build ``arch`` for ``num_classes`` logits at ``image_size`` px and load ``state`` into it.

    The state dict must hold exactly the architecture's parameters and buffers, each of the
    expected shape (BatchNorm's ``num_batches_tracked`` may be absent: inference ignores it).
    Otherwise a :class:`UserError` names ``source`` and the first tensor that does not fit,
    with the expected and found shapes. Returns the model in eval mode, on the CPU.
    """
    model = build_backbone(arch, num_classes, image_size)
    expected = model.state_dict()
    what = f"{arch} with {num_classes} classes at {image_size} px"
    for key, ref in expected.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue
            raise UserError(f"{source}: tensor {key!r} is missing; {what} expects it with shape "
                            f"{_shape(ref)}. Is the architecture, class count or image size wrong?")
        found = state[key]
        if not isinstance(found, torch.Tensor):
            raise UserError(f"{source}: entry {key!r} is a {type(found).__name__}, not a tensor.")
        if found.shape != ref.shape:
            raise UserError(f"{source}: tensor {key!r} has shape {_shape(found)}, but {what} "
                            f"expects {_shape(ref)}. Is the architecture, class count or image "
                            "size wrong?")
        if found.is_floating_point() != ref.is_floating_point():
            raise UserError(f"{source}: tensor {key!r} has dtype {found.dtype}, "
                            f"expected {ref.dtype}.")
    extra = [k for k in state if k not in expected]
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]!r} (shape "
                        f"{_shape(state[extra[0]])}; {len(extra)} unexpected in all) for {what}. "
                        "Is the architecture wrong?")
    model.load_state_dict(dict(state), strict=False)  # strictness checked above
    return model.eval()


Weights = nn.Module | Mapping[str, torch.Tensor]


def _state_of(weights: Weights) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies of a module's (or state dict's) tensors, as safetensors needs."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _record_json(rec: TeacherRecord) -> dict:
    return {**dataclasses.asdict(rec), "mean": list(rec.mean), "std": list(rec.std),
            "classes": list(rec.classes), "class_ids": list(rec.class_ids)}


def save_pool(folder: Path, teachers: Iterable[tuple[TeacherRecord, Weights]],
              inputs: Iterable[Path] = ()) -> list[TeacherRecord]:
    """Write ``(record, model or state dict)`` pairs to ``folder``, replacing it atomically.

    ``teachers`` may be a generator that trains them: each is checked against its record
    (:func:`model_from_state_dict`) and written as it arrives, so only one state dict is
    held at a time, and any exception leaves the previous pool untouched. ``name``,
    ``file`` and ``sha256`` of the given records are ignored and assigned here
    (``teacher_000``, ...). ``folder`` must be missing, empty or a pool, and contain none
    of ``inputs`` (the files the teachers come from). Returns the records as stored in ``pool.json``.
    """
    folder = Path(folder)
    stored: list[TeacherRecord] = []
    with atomic_dir(folder, POOL_FOLDER, inputs) as tmp:
        for i, (rec, weights) in enumerate(teachers):
            _check_record_fields(rec, f"teacher {i}")
            state = _state_of(weights)
            model_from_state_dict(state, rec.arch, rec.num_classes, rec.image_size, f"teacher {i}")
            name = f"teacher_{i:03d}"
            # one metadata key only: safetensors writes its metadata map in random (hash) order
            data = save_safetensors(state, metadata={"format": "pt"})
            (tmp / f"{name}.safetensors").write_bytes(data)
            stored.append(dataclasses.replace(rec, name=name, file=f"{name}.safetensors",
                                              sha256=hashlib.sha256(data).hexdigest()))
        if not stored:
            raise UserError(f"cannot write an empty teacher pool to {folder}.")
        doc = {"format": POOL_FORMAT, "version": POOL_VERSION,
               "teachers": [_record_json(r) for r in stored]}
        (tmp / POOL_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return stored


def _check_record_fields(rec: TeacherRecord, where: str) -> None:
    """Refuse records whose fields cannot describe a teacher (types were checked by the caller)."""
    if rec.arch not in ARCHITECTURES:
        raise UserError(f"{where}: unknown architecture {rec.arch!r}; choose one of: "
                        f"{', '.join(ARCHITECTURES)}.")
    if not 1 <= rec.image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"{where}: image_size must be from 1 to {MAX_IMAGE_SIZE}, got {rec.image_size}.")
    for name, values, low in (("mean", rec.mean, -math.inf), ("std", rec.std, 0.0)):
        if len(values) != 3 or not all(math.isfinite(v) and v > low for v in values):
            raise UserError(f"{where}: {name} must be 3 finite numbers{' above 0' if low == 0 else ''} (one per "
                            f"RGB channel), got {list(values)}; restore pool.json (`dvc checkout`) or re-import.")
    if rec.num_classes < 1 or len(rec.class_ids) != rec.num_classes:
        raise UserError(f"{where}: needs at least one class and one class_id per class "
                        f"(got {rec.num_classes} classes, {len(rec.class_ids)} class_ids).")
    if rec.accuracy is not None and not math.isfinite(rec.accuracy):
        raise UserError(f"{where}: accuracy must be a finite number or null, got {rec.accuracy}.")


def inside(folder: Path, name: str, what: str) -> Path:
    """``folder/name``, refusing a name that is absolute, climbs out (``..``) or links outside."""
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise UserError(f"{what}: {name!r} must be a plain path inside {folder} "
                        "(no '..', not absolute).")
    path = folder / rel
    if not path.resolve().is_relative_to(folder.resolve()):
        raise UserError(f"{what}: {name!r} is a link that points outside {folder}; "
                        "refusing to read it.")
    return path


def _field(entry: dict, key: str, kind: type | tuple[type, ...], where: str,
           optional: bool = False):
    if key not in entry:
        if optional:
            return None
        raise UserError(f"{where}: field {key!r} is missing.")
    value = entry[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise UserError(f"{where}: field {key!r} has the wrong type ({type(value).__name__}).")
    return value


def _triple(entry: dict, key: str, where: str) -> tuple[float, float, float]:
    value = _field(entry, key, list, where)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if len(value) != 3 or not numbers:
        raise UserError(f"{where}: field {key!r} must be a list of 3 numbers (RGB), got {value!r}.")
    return (float(value[0]), float(value[1]), float(value[2]))


def _parse_record(entry: object, where: str) -> TeacherRecord:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: each teacher must be a JSON object.")
    classes = _field(entry, "classes", list, where)
    class_ids = _field(entry, "class_ids", list, where)
    if not all(isinstance(c, str) for c in classes):
        raise UserError(f"{where}: 'classes' must be a list of class names.")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in class_ids):
        raise UserError(f"{where}: 'class_ids' must be a list of non-negative whole numbers.")
    accuracy = _field(entry, "accuracy", (int, float), where, optional=True)
    sha = _field(entry, "sha256", str, where)
    if not _SHA256.match(sha):
        raise UserError(f"{where}: 'sha256' must be 64 lowercase hex digits.")
    rec = TeacherRecord(
        arch=_field(entry, "arch", str, where), dataset=_field(entry, "dataset", str, where),
        image_size=_field(entry, "image_size", int, where),
        mean=_triple(entry, "mean", where), std=_triple(entry, "std", where),
        classes=tuple(classes), class_ids=tuple(class_ids),
        accuracy=None if accuracy is None else float(accuracy),
        name=_field(entry, "name", str, where), file=_field(entry, "file", str, where), sha256=sha,
    )
    _check_record_fields(rec, where)
    return rec


def read_records(folder: Path) -> list[TeacherRecord]:
    """The records of ``folder/pool.json``, validated, without reading any weights."""
    folder = Path(folder)
    path = folder / POOL_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: build the pool with `dvc repro pretrain` (or "
                        "`purer pretrain`), or import one with `purer teachers import`.")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); rebuild the pool.") from err
    if not isinstance(doc, dict) or doc.get("format") != POOL_FORMAT:
        raise UserError(f"{path} is not a teacher pool file "
                        f"(expected \"format\": \"{POOL_FORMAT}\").")
    if doc.get("version") != POOL_VERSION:
        raise UserError(f"{path}: pool format version {doc.get('version')!r} is not supported "
                        f"(this code reads version {POOL_VERSION}); rebuild the pool.")
    entries = doc.get("teachers")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: 'teachers' must be a non-empty list.")
    records = [_parse_record(e, f"{path}, teacher {i}") for i, e in enumerate(entries)]
    names = [r.file for r in records]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: two teachers share one weights file.")
    return records


def load_teacher(folder: Path, rec: TeacherRecord,
                 device: str | torch.device = "cpu") -> Classifier:
    """Verify and load the weights of one teacher of the pool in ``folder`` (eval mode)."""
    path = inside(Path(folder), rec.file, f"{Path(folder) / POOL_FILE}, {rec.name}")
    if not path.is_file():
        raise UserError(f"{rec.name}: weights file {path} is missing; "
                        "rebuild or re-import the pool.")
    data = path.read_bytes()
    # hash and parse the same bytes, so the file cannot change between the two
    if hashlib.sha256(data).hexdigest() != rec.sha256:
        raise UserError(f"{rec.name}: {path} does not match the SHA-256 in pool.json: the file was "
                        "modified or corrupted. Rebuild or re-import the pool.")
    try:
        state = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise UserError(f"{rec.name}: {path} is not a valid safetensors file ({err}).") from err
    model = model_from_state_dict(state, rec.arch, rec.num_classes, rec.image_size,
                                  f"{rec.name} ({path})")
    return model.to(device)


def load_pool(folder: Path,
              device: str | torch.device = "cpu") -> list[tuple[TeacherRecord, Classifier]]:
    """Every teacher of the pool in ``folder``, checked, as ``(record, model in eval mode)``."""
    return [(rec, load_teacher(folder, rec, device)) for rec in read_records(folder)]
