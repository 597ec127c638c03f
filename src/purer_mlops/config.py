"""``params.yaml`` → one typed, validated :class:`Params` object.

The seed's command-line option names (``dataset``, ``num_sup_train``, ``adv_scale``, ...)
are top-level keys, so ``dvc exp run -S adv_scale=0.5`` reads like the seed's flags.
Knobs the seed never exposed live in sections (``glyphs``, ``pretrain``, ``inversion``,
``metatrain``, ``metatest``, ``calibration``, ``compare``).

Every mistake (unknown key, wrong type, value out of range, impossible combination)
raises :class:`ConfigError`, whose message names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.registry import DATASETS
from .errors import UserError

BACKBONES = ("conv4", "resnet10", "resnet18", "resnet12")
META_LEARNERS = ("maml", "anil", "protonet")
METHODS = ("random", "average", "ei", "purer", "purer+icfil", "oracle")


class ConfigError(UserError):
    """A parameter is unknown, of the wrong type, out of range, or contradicts another."""


def _spec(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
          choices: tuple | None = None, doc: str = "") -> dict:
    """Validation metadata for a dataclass field (bounds, allowed values, help text)."""
    return {"ge": ge, "gt": gt, "le": le, "choices": choices, "doc": doc}


def knob(default: Any, **spec: Any) -> Any:
    """A dataclass field with a default and validation metadata (see :func:`_spec`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=_spec(**spec))
    return field(default=default, metadata=_spec(**spec))


@dataclass(frozen=True)
class GlyphsParams:
    """Glyph-FS generation (stage ``prepare``)."""

    images_per_class: int = knob(100, ge=1, doc="images rendered per character class")
    seed: int = knob(0, ge=0, doc="generator seed: same seed, same bytes")


@dataclass(frozen=True)
class PretrainParams:
    """Teacher pretraining (stage ``pretrain``); docs/teachers.md compares the two recipes."""

    recipe: str = knob("purer-mlops", choices=("purer-mlops", "reference"),
                       doc="purer-mlops: augmentation + cosine schedule; reference: the authors' init "
                       "and step schedule, no augmentation")
    steps: int = knob(300, ge=1, doc="optimiser steps per teacher when epochs is 0 (small datasets get more epochs)")
    epochs: int = knob(0, ge=0, doc="0: as many epochs as 'steps' needs; else exactly this many (reference: 60)")
    batch_size: int = knob(64, ge=1, doc="reference: 128")
    holdout: float = knob(0.2, gt=0.0, le=0.5, doc="per-class held-out fraction for model selection")
    conv4_lr: float = knob(0.01, gt=0.0, doc="Adam learning rate of conv4 teachers")
    resnet_lr: float = knob(0.01, gt=0.0, doc="SGD learning rate of ResNet teachers")
    momentum: float = knob(0.9, ge=0.0, le=1.0)
    weight_decay: float = knob(5e-4, ge=0.0)
    grad_clip: float = knob(50.0, gt=0.0)
    min_accuracy: float = knob(50.0, ge=0.0, le=100.0, doc="held-out accuracy (percent) every teacher "
                               "must reach, else the stage fails and keeps the previous pool")


@dataclass(frozen=True)
class InversionParams:
    """The learnable bank and the inversion loss (DeepInversion priors)."""

    lr: float = knob(0.25, gt=0.0, doc="Adam learning rate of the bank (PURER 0.25, PURER-Plus Glr 0.01)")
    bn: float = knob(0.01, ge=0.0, doc="weight of the BatchNorm-statistics term")
    tv: float = knob(1e-4, ge=0.0, doc="weight of the total-variation term")
    l2: float = knob(1e-5, ge=0.0, doc="weight of the l2 term")
    jitter: int = knob(2, ge=0, doc="random roll of the bank, in pixels, each direction")
    bf16: bool = knob(False, doc="bf16 autocast for the teachers' forward pass (CUDA only)")


@dataclass(frozen=True)
class MetatrainParams:
    """Meta-training bookkeeping (stage ``metatrain``)."""

    val_interval: int = knob(250, ge=1, doc="meta-iterations between meta-val evaluations")
    val_episodes: int = knob(100, ge=1, doc="meta-val tasks per evaluation (fixed, seeded)")
    checkpoint_interval: int = knob(50, ge=1, doc="meta-iterations between 'last' checkpoints")
    image_interval: int = knob(250, ge=1, doc="meta-iterations between bank image grids")
    batching: str = knob("auto", choices=("auto", "vmap", "loop"),
                         doc="vmap over teachers and tasks, or the plain loop; auto: vmap on CUDA, loop on CPU")


@dataclass(frozen=True)
class MetatestParams:
    """Meta-testing (stage ``metatest``)."""

    seed: int = knob(2023, ge=0, doc="seed of the fixed test tasks, shared by every method")
    reference_protocol: bool = knob(False, doc="also report the reference code's best TEST accuracy "
                                    "over all validated checkpoints (one meta-test per checkpoint)")


@dataclass(frozen=True)
class CalibrationParams:
    """ICFIL knobs (used when ``icfil`` is on); see docs/icfil.md."""

    images_per_class: int = knob(4, ge=1, doc="pseudo images synthesised per class of the task")
    inversion_steps: int = knob(15, ge=1, doc="Adam steps inverting the adapted model")
    inversion_lr: float = knob(0.1, gt=0.0)
    calibration_steps: int = knob(5, ge=0, doc="head-calibration steps on support + pseudo data")
    calibration_lr: float = knob(0.01, gt=0.0)
    pseudo_weight: float = knob(0.5, ge=0.0, doc="weight of the pseudo data in the calibration loss")


@dataclass(frozen=True)
class CompareParams:
    """The comparison table (stage ``compare``)."""

    methods: list = knob(list(METHODS), doc="subset of " + ", ".join(METHODS))
    shots: list = knob([1, 5], doc="support shots of the table's columns")


@dataclass(frozen=True)
class Params:
    """Every knob of the pipeline. See ``params.yaml`` for the documented defaults."""

    # data
    dataset: str = knob("glyphs", choices=tuple(DATASETS), doc="dataset the meta-model is tested on")
    seed: int = knob(0, ge=0, doc="global seed of pretraining and meta-training")
    # teacher pool
    pre_backbone: str = knob("conv4", choices=(*BACKBONES, "mix"), doc="teacher architecture")
    pool_mode: str = knob("blocks", choices=("blocks", "random"))
    APInum: int = knob(100, ge=1, doc="teachers of a random pool (PURER-Plus)")
    way_pretrain: int = knob(5, ge=2, doc="classes per teacher")
    pool_datasets: list = knob([], doc="datasets of the teachers (empty: [dataset])")
    # meta-model and meta-training
    backbone: str = knob("conv4", choices=BACKBONES, doc="meta-model architecture")
    meta_learner: str = knob("maml", choices=META_LEARNERS)
    way_train: int = knob(5, ge=2)
    num_sup_train: int = knob(1, ge=1)
    num_qur_train: int = knob(5, ge=1, doc="query images per class of a pseudo task (reference: 15)")
    episode_train: int = knob(6000, ge=1, doc="meta-training tasks (iterations × episode_batch)")
    episode_batch: int = knob(4, ge=1, doc="tasks per meta-iteration")
    inner_update_num: int = knob(1, ge=0)
    inner_lr: float = knob(0.01, gt=0.0)
    outer_lr: float = knob(0.001, gt=0.0)
    approx: bool = knob(False, doc="first-order MAML")
    synthesis_per_class: int = knob(6, ge=2, doc="bank images per class (shots + queries; reference: 16)")
    adv_scale: float = knob(10.0, ge=0.0, doc="weight of the adversarial (curriculum) term")
    adv_start: int = knob(100, ge=0, doc="meta-iteration at which the switch first turns on")
    patience: int = knob(6, ge=1, doc="stagnant meta-iterations before the switch turns on")
    eci: bool = knob(True, doc="curriculum switch on (ECI); off gives the EI ablation")
    average: bool = knob(True, doc="start from the teachers' parameter average when possible")
    candidate_size: int = knob(0, ge=0, doc="teachers per bank update (0: all)")
    # meta-testing
    way_test: int = knob(5, ge=2)
    num_sup_test: int = knob(1, ge=1)
    num_qur_test: int = knob(15, ge=1)
    episode_test: int = knob(600, ge=1)
    test_inner_update_num: int = knob(10, ge=0)
    icfil: bool = knob(False, doc="inversion calibration following the inner loop (test time)")
    # where to compute
    device: str = knob("auto", choices=("auto", "cpu", "cuda"), doc="auto: CUDA when present, else CPU")
    # tracking
    tracking: bool = knob(True, doc="log to MLflow")
    experiment_name: str = knob("purer", doc="MLflow experiment")
    # sections
    glyphs: GlyphsParams = field(default_factory=GlyphsParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    inversion: InversionParams = field(default_factory=InversionParams)
    metatrain: MetatrainParams = field(default_factory=MetatrainParams)
    metatest: MetatestParams = field(default_factory=MetatestParams)
    calibration: CalibrationParams = field(default_factory=CalibrationParams)
    compare: CompareParams = field(default_factory=CompareParams)

    @property
    def teacher_datasets(self) -> list[str]:
        """Datasets the teacher pool is built from."""
        return list(self.pool_datasets) or [self.dataset]

    @property
    def meta_iterations(self) -> int:
        """Meta-iterations: the reference counts tasks, one iteration is ``episode_batch`` tasks."""
        return max(1, self.episode_train // self.episode_batch)

    def flat(self) -> dict[str, Any]:
        """All parameters with dotted names for sections (``inversion.lr``), for logging."""
        out: dict[str, Any] = {}
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, dict):
                out.update({f"{name}.{k}": v for k, v in value.items()})
            else:
                out[name] = value
        return out

    def replace(self, **changes: Any) -> Params:
        """A copy with some top-level or dotted (``section.key``) values changed, validated."""
        raw = dataclasses.asdict(self)
        for key, value in changes.items():
            section, _, sub = key.partition(".")
            if sub:
                raw[section][sub] = value
            else:
                raw[key] = value
        return from_dict(raw)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown(key: str, known: typing.Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = (f" Did you mean '{where}{close[0]}'?" if close
            else f" Known keys: {', '.join(where + k for k in sorted(known))}.")
    return ConfigError(f"params.yaml: unknown key '{where}{key}'.{hint}")


def _check_value(name: str, value: Any, f: dataclasses.Field, hint: type) -> Any:
    """Check one scalar or list value against its annotated type and metadata."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"params.yaml: '{name}' must be true or false, got {value!r}.")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"params.yaml: '{name}' must be a whole number, got {value!r}.")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"params.yaml: '{name}' must be a number, got {value!r}.")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"params.yaml: '{name}' must be a string, got {value!r}.")
    elif hint is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"params.yaml: '{name}' must be a list, got {value!r}.")
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(
            f"params.yaml: '{name}' is {value!r}; choose one of: {', '.join(map(str, meta['choices']))}."
        )
    for bound, ok, word in (("ge", lambda v, b: v >= b, "at least"),
                            ("gt", lambda v, b: v > b, "greater than"),
                            ("le", lambda v, b: v <= b, "at most")):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            raise ConfigError(f"params.yaml: '{name}' is {value!r}; it must be {word} {b}.")
    return value


def _build(cls: type, raw: dict, where: str = "") -> Any:
    if not isinstance(raw, dict):
        what = f"'{where.rstrip('.')}'" if where else "the file"
        raise ConfigError(f"params.yaml: {what} must be a mapping of keys to values.")
    fields_ = _fields(cls)
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields_:
            raise _unknown(str(key), fields_, where)
    kwargs = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, f"{where}{key}.")
        else:
            kwargs[key] = _check_value(f"{where}{key}", value, fields_[key], hint)
    return cls(**kwargs)


def _check_combinations(p: Params) -> None:
    """Cross-field checks that need no data on disk."""
    for key in p.pool_datasets:
        if key not in DATASETS:
            raise ConfigError(
                f"params.yaml: 'pool_datasets' names unknown dataset {key!r}; "
                f"choose among: {', '.join(DATASETS)}."
            )
    for key in p.compare.methods:
        if key not in METHODS:
            raise ConfigError(f"params.yaml: 'compare.methods' has {key!r}; choose among: {', '.join(METHODS)}.")
    for shot in p.compare.shots:
        if isinstance(shot, bool) or not isinstance(shot, int) or shot < 1:
            raise ConfigError(f"params.yaml: 'compare.shots' must list positive whole numbers, got {shot!r}.")
    if p.average:
        sizes = {DATASETS[d].image_size for d in p.teacher_datasets}
        if p.pre_backbone != p.backbone or sizes != {DATASETS[p.dataset].image_size}:
            raise ConfigError(
                f"params.yaml: 'average' is true, but the pool (pre_backbone={p.pre_backbone}, "
                f"pool_datasets={p.teacher_datasets}) cannot be averaged into a {p.backbone} "
                f"meta-model at {DATASETS[p.dataset].image_size} px. Set average: false, or use "
                "teachers of the meta-model's architecture and resolution."
            )


def from_dict(raw: dict | None) -> Params:
    """Validate a parsed ``params.yaml`` mapping into :class:`Params`."""
    params = _build(Params, raw or {})
    _check_combinations(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; a missing or malformed file is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root, or pass --params PATH.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}. Fix the line it names.") from err
    return from_dict(raw)


def field_docs(cls: type = Params) -> dict[str, str]:
    """The help text of every field of ``cls`` (used by ``purer params``)."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}

