"""Reading ``params.yaml`` into :class:`~.params.Params`: YAML, types, ranges, combinations.

Every mistake (duplicate or unknown key, wrong type, value out of range, impossible
combination, an empty file) raises :class:`~.knobs.ConfigError`, whose message names the
key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..data.registry import DATASETS
from ..models.averaging import averaging_blocker
from .knobs import ConfigError
from .params import METHODS, Params


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (YAML says keys are unique;
    PyYAML would silently keep the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"params.yaml: key '{key}' appears twice (lines {seen[key]} and {line}); "
                                  "keep one of them.")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _unknown(key: str, known: Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = (f" Did you mean '{where}{close[0]}'?" if close
            else f" Known keys: {', '.join(where + k for k in sorted(known))}.")
    return ConfigError(f"params.yaml: unknown key '{where}{key}'.{hint}")


def _build(cls: type, raw: Any, where: str = "") -> Any:
    """An instance of the dataclass ``cls`` from a raw mapping, every value checked."""
    if not isinstance(raw, dict):
        what = f"'{where.rstrip('.')}'" if where else "the file"
        raise ConfigError(f"params.yaml: {what} must be a mapping of keys to values.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown(str(key), fields, where)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, f"{where}{key}.")
        else:
            kwargs[key] = fields[key].metadata["knob"].check(f"{where}{key}", value, hint)
    return cls(**kwargs)


def _check_lists(p: Params) -> None:
    for key in p.pool_datasets:
        if key not in DATASETS:
            raise ConfigError(f"params.yaml: 'pool_datasets' names unknown dataset {key!r}; "
                              f"choose among: {', '.join(DATASETS)}.")
    for key in ("mean", "std"):
        values = getattr(p.folder, key)
        if values and (len(values) != 3 or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                      and (0 < v if key == "std" else 0 <= v <= 1) for v in values)):
            raise ConfigError(f"params.yaml: 'folder.{key}' must be empty (computed from the images) or three "
                              f"numbers{' > 0' if key == 'std' else ' in [0, 1]'} (R, G, B), got {values!r}.")
    for key in p.compare.methods:
        if key not in METHODS:
            raise ConfigError(f"params.yaml: 'compare.methods' has {key!r}; choose among: {', '.join(METHODS)}.")
    for shot in p.compare.shots:
        if isinstance(shot, bool) or not isinstance(shot, int) or shot < 1:
            raise ConfigError(f"params.yaml: 'compare.shots' must list positive whole numbers, got {shot!r}.")


def _check_combinations(p: Params) -> None:
    """Cross-field checks that need no data on disk."""
    _check_lists(p)
    if p.average:
        sizes = [p.image_size(d) for d in p.teacher_datasets]
        blocker = averaging_blocker([p.pre_backbone], sizes, p.backbone, p.image_size(p.dataset))
        if blocker:
            raise ConfigError(
                f"params.yaml: 'average' is true, but the pool (pre_backbone={p.pre_backbone}, "
                f"pool_datasets={p.teacher_datasets}): {blocker}. Set average: false, or use "
                "teachers of the meta-model's architecture and resolution."
            )


def from_dict(raw: dict | None) -> Params:
    """Validate a parsed ``params.yaml`` mapping into :class:`Params`."""
    params = _build(Params, raw or {})
    _check_combinations(params)
    return params


def with_changes(params: Params, changes: Mapping[str, Any]) -> Params:
    """``params`` with top-level or dotted (``section.key``) values changed, validated."""
    raw = dataclasses.asdict(params)
    for key, value in changes.items():
        section, _, sub = key.partition(".")
        if not sub:
            raw[key] = value
        elif isinstance(raw.get(section), dict):
            raw[section][sub] = value
        elif section in raw:
            raise ConfigError(f"params.yaml: '{section}' is a single value, so '{key}' does not exist; "
                              f"set '{section}' itself.")
        else:
            raise _unknown(key, params.flat(), "")
    return from_dict(raw)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; a missing, empty or malformed file is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root, or pass --params PATH.")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}. Fix the line it names.") from err
    if raw is None:
        raise ConfigError(f"{path} is empty: restore it from git (`git checkout {path.name}`) or copy the "
                          "project's params.yaml; every knob must be written down.")
    return from_dict(raw)
