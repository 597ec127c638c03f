"""What the knob declarations say, in the forms other parts of the project need.

- :func:`stage_knobs`: the knobs a stage reads, which its ``params:`` in ``dvc.yaml`` must list
  (:func:`dvc_params_problems` compares them);
- :func:`fingerprint_knobs`: the knobs that change what meta-training computes;
- :func:`parameters_markdown`: ``docs/parameters.md`` (``purer params --markdown``).
"""

from __future__ import annotations

from typing import Any

import yaml

from .knobs import GROUPS, METATRAIN, STAGES, Knob, knobs_of
from .params import Params

INTRO = """# Parameters

Every knob lives in `params.yaml`; `purer params` validates the file and prints each value.
Top-level names are the seed's command-line options, so `dvc exp run -S adv_scale=0.5`
reads like `--adv_scale 0.5`; other knobs live in sections and are set with dotted names
(`dvc exp run -S inversion.lr=0.01`). A mistake (unknown or repeated key, wrong type, value
out of range or not finite, impossible combination, an empty file) stops every command
before it writes anything, with one line naming the key, and exit code 2.

*Stages* lists the stages of `dvc.yaml` that read a parameter (their `params:`): changing it
re-runs those stages and everything downstream of them, and nothing else. The comparison
table (`compare/dvc.yaml`) depends on the whole file.

This page is generated from the declarations in `src/purer_mlops/config/params.py`
(`purer params --markdown > docs/parameters.md`); a test checks it is up to date.
"""


def all_knobs() -> dict[str, tuple[Knob, Any]]:
    """Flat knob name → (its declaration, its default), in declaration order."""
    return knobs_of(Params)


def stage_knobs(stage: str) -> set[str]:
    """Flat names of the knobs ``stage`` reads."""
    return {name for name, (k, _) in all_knobs().items() if stage in k.stages}


def fingerprint_knobs() -> set[str]:
    """Knobs whose value changes what meta-training computes (a checkpoint's identity)."""
    return {name for name, (k, _) in all_knobs().items() if METATRAIN in k.stages and not k.bookkeeping}


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def parameters_markdown() -> str:
    """docs/parameters.md: one table per group, one row per knob."""
    lines = [INTRO]
    knobs = all_knobs()
    for group in GROUPS:
        lines += [f"## {group}", "", "| Parameter | Default | Meaning | Stages |", "|---|---|---|---|"]
        for name, (k, default) in knobs.items():
            if k.group == group:
                stages = ", ".join(k.stages) or "compare"
                lines.append(f"| `{name}` | `{_cell(default)}` | {k.help} | {stages} |")
        lines.append("")
    return "\n".join(lines)


def _listed(entries: list, flat: set[str]) -> set[str]:
    """Flat knob names a stage's ``params:`` entries cover (a section name covers its knobs)."""
    out: set[str] = set()
    for entry in entries:
        names = [entry] if isinstance(entry, str) else [k for ks in entry.values() for k in (ks or flat)]
        for name in names:
            out |= {k for k in flat if k == name or k.startswith(f"{name}.")}
    return out


def dvc_params_problems(dvc_yaml: str) -> list[str]:
    """Differences between each stage's ``params:`` in the text of ``dvc.yaml`` and the knobs it reads."""
    stages = yaml.safe_load(dvc_yaml).get("stages") or {}
    flat = set(all_knobs())
    problems = []
    for stage in STAGES:
        listed = _listed((stages.get(stage) or {}).get("params", []), flat)
        for name in sorted(stage_knobs(stage) - listed):
            problems.append(f"stage '{stage}' reads '{name}' but its params: does not list it")
        for name in sorted(listed - stage_knobs(stage)):
            problems.append(f"stage '{stage}' lists '{name}' in params: but does not read it")
    return problems
