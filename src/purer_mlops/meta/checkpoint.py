"""What a meta-training run leaves on disk, and reading it back safely.

- a **model**: ``<stem>.safetensors`` (weights) + ``<stem>.json`` (its model card: what is
  needed to rebuild and use it), for ``best``, ``last`` and every validated iteration;
- the **resume state** ``last.pt``: everything :class:`~.trainer.MetaTrainer` needs to go on,
  stamped with the run's **fingerprint** (the knobs that change what training computes, the
  oracle flag and the pool's ``pool.json``), so only the run it belongs to resumes from it;
- ``in_progress.json`` from the start of a run until it finishes: the models beside it are
  then a run's first iterations, and :func:`load_model` refuses them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..config import Params
from ..config.derived import fingerprint_knobs
from ..errors import UserError
from ..fileio import OutputFolder, write_bytes, write_json
from ..models.backbones import ARCHITECTURES, Classifier, build_backbone
from ..models.learners import LEARNERS
from ..models.pool_storage import MAX_IMAGE_SIZE
from ..paths import ModelDir

HISTORY_FOLDER = OutputFolder("a folder of validated models (iter_*.safetensors, iter_*.json)",
                              r"iter_\d+\.(safetensors|json)")


# Knobs since removed, at the value that computes what the code now always computes: with them the
# fingerprint, so ``last.pt``'s bytes and the resumption of a run begun before, stay what they were.
RETIRED_KNOBS = {"metatrain.batching": "auto"}


def fingerprint(params: Params, pool_dir: Path, oracle: bool) -> str:
    """Identity of a run: a checkpoint is resumed (or reused) only by the run it belongs to."""
    pool_json = pool_dir / "pool.json"
    keys = fingerprint_knobs()
    training = {**RETIRED_KNOBS, **{k: v for k, v in params.flat().items() if k in keys}}
    blob = json.dumps({"params": training, "oracle": oracle,
                       "pool": pool_json.read_text() if pool_json.is_file() else None}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def model_card(params: Params, image_size: int, norm: tuple[tuple, tuple], oracle: bool,
               iteration: int, accuracy: float) -> dict:
    """What a checkpoint needs to be rebuilt and used; ``norm`` is the dataset's (mean, std).

    ``preprocessing`` says how an image becomes the model's input (``data.dataset.decode_image``:
    RGB, bilinear resize to ``image_size``, then (x/255 − mean)/std); ``adaptation`` is the
    test-time inner loop (meta-val's, so meta-test's) and the query batch it was scored with
    (BatchNorm uses batch statistics). `purer adapt` and the MLflow model read both; cards
    written before them lack them and are refused there, not here.
    """
    return {"backbone": params.backbone, "way": params.way_train, "image_size": image_size,
            "meta_learner": params.meta_learner, "dataset": params.dataset, "iteration": iteration,
            "val_accuracy": accuracy, "mean": list(norm[0]), "std": list(norm[1]), "oracle": oracle,
            "preprocessing": {"mode": "RGB", "resize": "bilinear"},
            "adaptation": {"inner_steps": params.test_inner_update_num, "inner_lr": params.inner_lr,
                           "query_batch": params.way_test * params.num_qur_test}}


def save_model(model: Classifier, card: dict, stem: Path) -> None:
    """Write ``<stem>.safetensors`` (weights) and ``<stem>.json`` (its model card, with the
    weights file's SHA-256 that :func:`load_model` checks), atomically."""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # serialised in memory: safetensors' save_file re-creates the file with mode 0600
    data = save(weights)
    write_bytes(stem.with_suffix(".safetensors"), data)
    write_json(stem.with_suffix(".json"), {**card, "sha256": hashlib.sha256(data).hexdigest()})


def check_finished(models: ModelDir) -> None:
    """Refuse the models of a run that has not finished (killed, or still running)."""
    if models.in_progress.is_file():
        raise UserError(f"{models.folder} holds the first iterations of a meta-training run that has not "
                        f"finished ({models.in_progress.name}): re-run `purer metatrain` to finish it (it "
                        f"resumes), or `dvc checkout {models.folder}` to restore the last committed models.")


def weights_architecture(state: dict[str, torch.Tensor], way: int, image_size: int) -> str | None:
    """The backbone whose meta-model has exactly the tensors of ``state``; None if none has."""
    for arch in ARCHITECTURES:
        expected = build_backbone(arch, way, image_size, track_running_stats=False).state_dict()
        if expected.keys() == state.keys() and all(v.shape == state[k].shape for k, v in expected.items()):
            return arch
    return None


def _whole(low: int, high: int) -> tuple[Callable[[object], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high,
            f"a whole number from {low} to {high}")


def _number(low: float, high: float) -> tuple[Callable[[object], bool], str]:
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and low < v <= high, f"a finite number above {low} and at most {high}")


def _triple(low: float) -> tuple[Callable[[object], bool], str]:
    return (lambda v: isinstance(v, list) and len(v) == 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > low for x in v),
        f"a list of 3 finite numbers above {low}")


# What a card's fields may hold (`purer adapt` and metatest trust them: an image size of 100000
# or a NaN learning rate would run away or predict NaN). The bounds are documented in
# docs/reliability.md; a path is "a.b" for a field of a nested section.
CARD_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "backbone": (lambda v: v in ARCHITECTURES, f"one of {', '.join(ARCHITECTURES)}"),
    "meta_learner": (lambda v: v in LEARNERS, f"one of {', '.join(LEARNERS)}"),
    "way": _whole(2, 1000),
    "image_size": _whole(4, MAX_IMAGE_SIZE),
    "iteration": _whole(0, 10**9),
    "mean": _triple(-math.inf),
    "std": _triple(0.0),
    "adaptation.inner_steps": _whole(0, 1000),
    "adaptation.inner_lr": _number(0.0, 100.0),
    "adaptation.query_batch": _whole(1, 100_000),
    "sha256": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
               "the 64 hex digits of the weights file's SHA-256"),
}
# Cards written before the hash was recorded are read without it.
OPTIONAL_CARD_FIELDS = frozenset({"sha256"})


def check_card(card: object, path: Path) -> None:
    """Refuse a card field that is missing, of the wrong type or out of bounds, in one line
    naming the file, the field and the fix (cards without the test-time sections are older
    cards: `purer adapt` refuses them with its own message)."""
    if not isinstance(card, dict):
        raise UserError(f"model card {path} is not a JSON object: restore it (`dvc checkout {path.parent}`) or "
                        "re-run `purer metatrain`.")
    for field, (valid, wanted) in CARD_FIELDS.items():
        section, _, key = field.rpartition(".")
        holder = card.get(section) if section else card
        if section and not isinstance(holder, dict):
            continue
        if key not in holder and field in OPTIONAL_CARD_FIELDS:
            continue
        value = holder.get(key, "<missing>")
        if not valid(value):
            raise UserError(f"model card {path}: field '{field}' is {value!r}; it must be {wanted}. Restore the "
                            f"card (`dvc checkout {path.parent}`) or re-run `purer metatrain`.")


def load_model(stem: Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    """Rebuild a meta-model saved by :func:`save_model` (no unpickling: safetensors + JSON); its
    card is checked field by field and its weights must be finite."""
    weights, card_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not weights.is_file() or not card_path.is_file():
        raise UserError(f"meta-model {weights} (and its .json card) not found: run `purer metatrain` "
                        "(or `dvc repro metatrain`) first.")
    check_finished(ModelDir(stem.parent))
    try:
        card = json.loads(card_path.read_text())
        check_card(card, card_path)
        model = build_backbone(card["backbone"], card["way"], card["image_size"], track_running_stats=False)
        data = weights.read_bytes()
        if "sha256" in card and hashlib.sha256(data).hexdigest() != card["sha256"]:
            raise UserError(f"meta-model {weights} does not match the SHA-256 in its card {card_path.name}: the file "
                            f"was changed or corrupted. Restore it (`dvc checkout {stem.parent}`) or re-run "
                            "`purer metatrain`.")
        state = load(data)
        if state.keys() != model.state_dict().keys():
            found = weights_architecture(state, card["way"], card["image_size"]) or "of no known backbone"
            raise UserError(f"meta-model {weights}: its card {card_path.name} says backbone {card['backbone']}, "
                            f"but the weights are {found}. Restore the card (`dvc checkout {stem.parent}`) or "
                            "re-run `purer metatrain`.")
        model.load_state_dict(state, strict=True)
        broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise UserError(f"meta-model {weights}: tensor {broken[0]} holds NaN or Inf (a corrupt file or cache "
                            f"object): restore it (`dvc checkout {stem.parent}`) or re-run `purer metatrain`.")
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        reason = " ".join(str(err).split())  # load_state_dict's message spans lines
        raise UserError(f"meta-model {weights} is unreadable or does not match its card ({reason}); "
                        "re-run `purer metatrain`.") from err
    return model.to(device), card


def save_resume_state(path: Path, fp: str, state: dict) -> None:
    """Write ``state`` stamped with the fingerprint ``fp`` to ``path`` (``last.pt``), atomically.

    Serialised in memory (a few MB: the model, its optimiser and the bank), then written: torch
    reports a full disk as a ``RuntimeError`` from its zip writer, a plain write as the ``OSError``
    that :func:`~purer_mlops.fileio.write_bytes` turns into its one line. Into a buffer, not a
    path: torch names the zip's root folder after a path's stem, which would make two identical
    runs' last.pt differ in bytes.
    """
    buffer = io.BytesIO()
    torch.save({"fingerprint": fp, **state}, buffer)
    write_bytes(path, buffer.getvalue())


def matching_resume_state(path: Path, fp: str) -> dict | None:
    """The state saved at ``path`` when it belongs to the run ``fp``; None when it is missing,
    unreadable (a corrupt checkpoint cannot be resumed: the run starts over) or another run's."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure to read means "nothing to resume"
        return None
    return state if isinstance(state, dict) and state.get("fingerprint") == fp else None
