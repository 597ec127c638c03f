"""The runs of a set of DVC experiments: each one's parameters, seed and headline metrics.

Read from ``dvc exp show --json`` (DVC's own view: the baseline commit and its experiments,
queued or failed ones without metrics left out), so a summary covers exactly what the
experiments table lists.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..stages.headline import TEST_ACC, VAL_BEST

SEED = "seed"  # the top-level param every setting is repeated over


@dataclass(frozen=True)
class Run:
    """One finished experiment: ``params`` flattened (``section.key``) without the seed."""

    name: str
    seed: int
    params: dict[str, Any]
    val: float | None  # best meta-val accuracy (percent), the selected model's
    test: float  # meta-test accuracy (percent)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def exp_show(root: Path) -> list[dict]:
    """The parsed ``dvc exp show --json`` of the repository at ``root``."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"`dvc exp show --json` failed in {root}: {last} Run it in the project's DVC repository.")
    return json.loads(proc.stdout)


def _entries(shown: list[dict]) -> Iterator[tuple[str, dict]]:
    """(name, data) of every baseline commit and experiment, the workspace left out (it repeats
    the last run, or holds an unfinished one)."""
    for baseline in shown:
        if baseline.get("rev") != "workspace":
            yield baseline.get("name") or baseline["rev"][:7], baseline.get("data") or {}
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs") or []:
                yield rev.get("name") or rev["rev"][:7], rev.get("data") or {}


def _run(name: str, data: dict) -> Run | None:
    """The run of one entry, or None when it has no meta-test accuracy (queued, failed)."""
    metrics: dict[str, Any] = {}
    for found in (data.get("metrics") or {}).values():
        metrics.update(flatten(found.get("data") or {}))
    params: dict[str, Any] = {}
    for found in (data.get("params") or {}).values():
        params.update(flatten(found.get("data") or {}))
    if not isinstance(metrics.get(TEST_ACC), (int, float)) or SEED not in params:
        return None
    seed = params.pop(SEED)
    val = metrics.get(VAL_BEST)
    return Run(name, int(seed), params, float(val) if isinstance(val, (int, float)) else None,
               float(metrics[TEST_ACC]))


def dvc_runs(shown: list[dict]) -> list[Run]:
    """The finished runs of ``dvc exp show --json``'s output, one per setting and seed (the first
    listed: a run repeated with the same params and seed gives the same numbers on one machine)."""
    runs: dict[tuple[str, int], Run] = {}
    for name, data in _entries(shown):
        run = _run(name, data)
        if run is not None:
            runs.setdefault((setting_key(run.params), run.seed), run)
    if not runs:
        raise UserError(f"no experiment has a meta-test accuracy ({TEST_ACC} in results/metatest/metrics.json): "
                        "run `dvc repro` or `dvc exp run` (and `dvc queue start`) first.")
    return list(runs.values())


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def setting_key(params: dict[str, Any]) -> str:
    """A hashable name of a setting: every param but the seed, as sorted JSON; numbers as floats
    (``-S adv_scale=10`` writes 10 where params.yaml has 10.0: the same setting)."""
    return json.dumps({k: float(v) if is_number(v) else v for k, v in params.items()}, sort_keys=True, default=str)
