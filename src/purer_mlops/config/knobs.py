"""One declaration per knob: its default, type, range, help text and the stages that read it.

Every field of the parameter dataclasses (:mod:`.params`) is made with :func:`knob`, whose
metadata (:class:`Knob`) is the single source from which validation (:mod:`.loading`),
``purer params``, ``docs/parameters.md`` and the check of ``dvc.yaml``'s ``params:`` lists
(:mod:`.derived`) are derived.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

# The stages of the main pipeline (dvc.yaml), in pipeline order. The comparison table
# (compare/dvc.yaml) depends on the whole params.yaml and reads most knobs.
PREPARE, FILELIST, PRETRAIN, METATRAIN, METATEST = "prepare", "filelist", "pretrain", "metatrain", "metatest"
STAGES = (PREPARE, FILELIST, PRETRAIN, METATRAIN, METATEST)

# Groups of docs/parameters.md, in order.
DATA, POOL, TRAINING, TESTING, RUNTIME = "Data", "Teacher pool", "Meta-training", "Meta-testing", \
    "Compute and tracking"
GROUPS = (DATA, POOL, TRAINING, TESTING, RUNTIME)

# Seeds feed torch, numpy and derived seeds (seed·1000003 + i): keep them in 32 bits.
MAX_SEED = 2**32 - 1


class ConfigError(UserError):
    """A parameter is unknown, of the wrong type, out of range, or contradicts another."""


@dataclass(frozen=True)
class Knob:
    """What the project knows about one knob besides its default and type.

    Attributes:
        help: one-line meaning, shown by ``purer params`` and in docs/parameters.md.
        stages: the dvc.yaml stages whose code reads it (their ``params:`` must list it).
        ge, gt, le: numeric bounds; choices: the allowed values.
        group: the docs/parameters.md table it appears in (sections: set on the section).
        bookkeeping: read by meta-training without changing what it computes (intervals of
            checkpoints and images, tracking): left out of a run's fingerprint.
    """

    help: str
    stages: tuple[str, ...]
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    group: str | None = None
    bookkeeping: bool = False

    def check(self, name: str, value: Any, hint: Any) -> Any:
        """``value`` converted to the annotated type; :class:`ConfigError` naming ``name`` otherwise."""
        if hint is str and isinstance(value, bool) and self.choices is not None and {"on", "off"} <= set(self.choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on / off (as `-S key=on` writes it) as a boolean
        value = _check_type(name, value, hint)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"params.yaml: '{name}' is {value}; it must be a finite number.")
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"params.yaml: '{name}' is empty; it must be a non-empty string.")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"params.yaml: '{name}' is {value!r}; choose one of: "
                              f"{', '.join(map(str, self.choices))}.")
        for bound, ok, word in (("ge", lambda v, b: v >= b, "at least"),
                                ("gt", lambda v, b: v > b, "greater than"),
                                ("le", lambda v, b: v <= b, "at most")):
            limit = getattr(self, bound)
            if limit is not None and not ok(value, limit):
                raise ConfigError(f"params.yaml: '{name}' is {value!r}; it must be {word} {limit}.")
        return value


def _check_type(name: str, value: Any, hint: Any) -> Any:
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"params.yaml: '{name}' must be true or false, got {value!r}.")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"params.yaml: '{name}' must be a whole number, got {value!r}.")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"params.yaml: '{name}' must be a number, got {value!r}.")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"params.yaml: '{name}' must be a string, got {value!r}.")
    if (hint is list or typing.get_origin(hint) is list) and not isinstance(value, list):
        raise ConfigError(f"params.yaml: '{name}' must be a list, got {value!r}.")
    return value


def knob(default: Any, help: str, *stages: str, **spec: Any) -> Any:
    """A dataclass field with a default and its :class:`Knob` (``spec``: bounds, choices, group)."""
    meta = {"knob": Knob(help, stages, **spec)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, group: str) -> Any:
    """A dataclass field holding the section ``cls`` whose knobs appear under ``group``."""
    return field(default_factory=cls, metadata={"group": group})


def knobs_of(cls: type, prefix: str = "", group: str | None = None) -> dict[str, tuple[Knob, Any]]:
    """Every knob of ``cls`` (sections flattened as ``section.key``) → (its :class:`Knob`, default)."""
    out: dict[str, tuple[Knob, Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(knobs_of(hints[f.name], f"{prefix}{f.name}.", f.metadata["group"]))
            continue
        spec = f.metadata["knob"]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out[prefix + f.name] = (spec if spec.group else dataclasses.replace(spec, group=group), default)
    return out
