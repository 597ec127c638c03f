"""Runs grouped into settings (every param but the seed), with intervals over seeds.

Per setting: n, the mean and 95% t-interval of meta-val and meta-test accuracy over its seeds;
against a reference setting, the per-seed difference (paired by seed: the same seed gives the
same teachers and the same starting point), its mean, 95% t-interval and two-sided p-value of
the paired t-test. One run of each setting compares mostly noise (sd ≈ 1.6 points between
seeds on the default Glyph-FS run); the interval says how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml
from scipy import stats

from ..errors import UserError
from .experiments import Run, is_number, setting_key


@dataclass(frozen=True)
class Interval:
    """Mean and half-width of its 95% t-interval over ``n`` values (nan for n < 2); ``p`` the
    two-sided p-value of "the mean is 0" (for differences)."""

    mean: float
    half: float
    n: int
    p: float = math.nan


@dataclass
class Setting:
    """One setting: its params (seed aside), a label naming the params that vary, its runs."""

    label: str
    params: dict[str, Any]
    runs: list[Run] = field(default_factory=list)

    def values(self, metric: str) -> dict[int, float]:
        """``{seed: value}`` of ``metric`` ("val" or "test"), runs without it left out."""
        return {r.seed: getattr(r, metric) for r in self.runs if getattr(r, metric) is not None}


def t_interval(values: list[float]) -> Interval:
    """Mean, 95% t-interval half-width and p-value (mean = 0) of ``values``."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, 0)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, math.nan, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_1samp(values, 0.0).pvalue) if sd > 0 else (1.0 if mean == 0 else 0.0)
    return Interval(mean, float(half), n, p)


def paired(values: dict[int, float], reference: dict[int, float]) -> Interval:
    """The difference ``values − reference`` over the seeds both have."""
    seeds = sorted(set(values) & set(reference))
    return t_interval([values[s] - reference[s] for s in seeds])


def _order(value: Any) -> tuple:
    return (0, float(value), "") if is_number(value) else (1, 0.0, str(value))


def _shown(value: Any) -> str:
    """A param's value in a label: 10 and 10.0 alike as ``10``."""
    return f"{value:g}" if is_number(value) else str(value)


def group(runs: list[Run]) -> list[Setting]:
    """The settings of ``runs``, labelled by the params that differ between them, in the order of
    those params' values."""
    settings: dict[str, Setting] = {}
    for run in sorted(runs, key=lambda r: r.seed):
        settings.setdefault(setting_key(run.params), Setting("", run.params)).runs.append(run)
    keys = sorted({k for s in settings.values() for k in s.params})
    varying = [k for k in keys if len({_shown(s.params.get(k)) for s in settings.values()}) > 1]
    for s in settings.values():
        s.label = ", ".join(f"{k}={_shown(s.params.get(k))}" for k in varying) or "all runs"
    return sorted(settings.values(), key=lambda s: [_order(s.params.get(k)) for k in varying])


def _same(a: Any, b: Any) -> bool:
    return float(a) == float(b) if is_number(a) and is_number(b) else a == b


def find_reference(settings: list[Setting], spec: str) -> Setting:
    """The one setting matching ``spec`` (``key=value[,key=value...]``, values read as YAML)."""
    wanted: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, raw = part.partition("=")
        if not sep:
            raise UserError(f"--reference {spec!r}: write it as key=value (e.g. --reference adv_scale=10).")
        wanted[key.strip()] = yaml.safe_load(raw)
    known = {k for s in settings for k in s.params}
    unknown = sorted(set(wanted) - known)
    if unknown:
        raise UserError(f"--reference names {', '.join(unknown)}, not a param of these experiments "
                        f"(the seed is not a setting); use one of the params that vary, e.g. {settings[0].label}.")
    found = [s for s in settings if all(_same(s.params.get(k), v) for k, v in wanted.items())]
    if len(found) != 1:
        labels = "; ".join(s.label for s in settings)
        what = "no setting" if not found else f"{len(found)} settings"
        raise UserError(f"--reference {spec!r} matches {what}; choose one of: {labels}.")
    return found[0]


def summarize(runs: list[Run], reference: str | None = None) -> list[dict[str, Any]]:
    """One row per setting: ``setting``, ``n``, ``seeds``, ``val_mean``, ``val_ci``, ``test_mean``,
    ``test_ci`` and, with a ``reference``, ``pairs``, ``d_val``, ``d_val_ci``, ``d_val_p``,
    ``d_test``, ``d_test_ci``, ``d_test_p`` (empty on the reference's own row)."""
    settings = group(runs)
    ref = find_reference(settings, reference) if reference else None
    rows = []
    for s in settings:
        row: dict[str, Any] = {"setting": s.label, "n": len(s.runs),
                               "seeds": " ".join(str(r.seed) for r in s.runs)}
        for metric in ("val", "test"):
            ci = t_interval(list(s.values(metric).values()))
            row.update({f"{metric}_mean": ci.mean, f"{metric}_ci": ci.half})
        if ref is not None:
            row["reference"] = s is ref
            for metric in ("val", "test"):
                d = paired(s.values(metric), ref.values(metric)) if s is not ref else None
                row["pairs"] = d.n if d else None
                row.update({f"d_{metric}": d.mean if d else None, f"d_{metric}_ci": d.half if d else None,
                            f"d_{metric}_p": d.p if d else None})
        rows.append(row)
    return rows


def seed_points(runs: list[Run]) -> list[tuple[str, list[tuple[int, float | None, float]]]]:
    """``(label, [(seed, val, test), ...])`` per setting, in :func:`group`'s order (for the plot)."""
    return [(s.label, [(r.seed, r.val, r.test) for r in s.runs]) for s in group(runs)]
