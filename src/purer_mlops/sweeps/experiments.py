"""The runs of a set of experiments: each one's parameters, seed and headline metrics.

Two sources: ``dvc exp show --json`` (DVC's own view: the baseline commit and its experiments,
queued or failed ones without metrics left out), so a summary covers exactly what the
experiments table lists; or run folders, each the ``--root`` of ``purer metatrain`` (and
``purer metatest``): its ``params.yaml`` and ``results/*/metrics.json``. A run needs a meta-val
or a meta-test accuracy: a sweep that selects on meta-val never runs meta-test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

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
    test: float | None  # meta-test accuracy (percent); None where meta-test was not run


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


def _number(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if is_number(value) else None


def _run(name: str, params: dict[str, Any], metrics: dict[str, Any]) -> Run | None:
    """The run of flattened ``params`` and ``metrics``, or None when it has neither a meta-val nor
    a meta-test accuracy (queued, failed) or no seed."""
    val, test = _number(metrics, VAL_BEST), _number(metrics, TEST_ACC)
    if (val is None and test is None) or SEED not in params:
        return None
    params = dict(params)
    return Run(name, int(params.pop(SEED)), params, val, test)


def _found(data: dict, kind: str) -> dict[str, Any]:
    """The ``kind`` ("metrics" or "params") of one ``dvc exp show`` entry, all files flattened into one."""
    out: dict[str, Any] = {}
    for found in (data.get(kind) or {}).values():
        out.update(flatten(found.get("data") or {}))
    return out


def dvc_runs(shown: list[dict]) -> list[Run]:
    """The finished runs of ``dvc exp show --json``'s output, one per setting and seed (the first
    listed: a run repeated with the same params and seed gives the same numbers on one machine)."""
    runs: dict[tuple[str, int], Run] = {}
    for name, data in _entries(shown):
        run = _run(name, _found(data, "params"), _found(data, "metrics"))
        if run is not None:
            runs.setdefault((setting_key(run.params), run.seed), run)
    if not runs:
        raise UserError(f"no experiment has a meta-val or meta-test accuracy ({VAL_BEST}, {TEST_ACC} in "
                        "results/*/metrics.json): run `dvc repro` or `dvc exp run` (and `dvc queue start`) first.")
    return list(runs.values())


def _read(path: Path, what: str) -> dict[str, Any]:
    """A JSON or YAML mapping; one-line errors for an unreadable or non-mapping file."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {what} {path}: {type(err).__name__}. Give run folders that "
                        "`purer metatrain --root` wrote.") from err
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a mapping: give run folders that `purer metatrain --root` wrote.")
    return data


def folder_runs(folders: list[Path]) -> list[Run]:
    """The runs of project folders (each a ``purer metatrain --root``): ``params.yaml`` and the
    metrics of ``results/metatrain`` and, where it ran, ``results/metatest``; named by the folder."""
    runs = []
    for folder in folders:
        params = flatten(_read(folder / "params.yaml", "the run's params"))
        metrics: dict[str, Any] = {}
        for stage in ("metatrain", "metatest"):
            if (folder / "results" / stage / "metrics.json").is_file():
                metrics.update(_read(folder / "results" / stage / "metrics.json", f"the {stage} metrics"))
        run = _run(folder.name, params, metrics)
        if run is None:
            raise UserError(f"{folder} has no finished run (no {VAL_BEST} in results/metatrain/metrics.json nor "
                            f"{TEST_ACC} in results/metatest/metrics.json, or no seed): run `purer metatrain "
                            f"--root {folder}` first, or leave it out.")
        twin = next((r for r in runs if r.seed == run.seed and setting_key(r.params) == setting_key(run.params)), None)
        if twin is not None:
            raise UserError(f"{folder} repeats run folder {twin.name}: the same params and seed {run.seed}. "
                            "Give each setting and seed once.")
        runs.append(run)
    return runs


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def setting_key(params: dict[str, Any]) -> str:
    """A hashable name of a setting: every param but the seed, as sorted JSON; numbers as floats
    (``-S adv_scale=10`` writes 10 where params.yaml has 10.0: the same setting)."""
    return json.dumps({k: float(v) if is_number(v) else v for k, v in params.items()}, sort_keys=True, default=str)
