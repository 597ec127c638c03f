"""The summary of a sweep as a text table, Markdown, CSV, a plot, and an MLflow run."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ..fileio import write_text
from .experiments import Run
from .summary import seed_points

HEAD = ["setting", "n", "seeds", "meta-val %", "meta-test %"]
DIFF_HEAD = ["Δ meta-val (p)", "Δ meta-test (p)"]


def _ci(mean: float, half: float | None) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if half is None or math.isnan(half) else f"{mean:.2f} ± {half:.2f}"


def _diff(row: dict[str, Any], metric: str) -> str:
    if row.get("reference"):
        return "reference"
    mean, half, p = row[f"d_{metric}"], row[f"d_{metric}_ci"], row[f"d_{metric}_p"]
    if math.isnan(row[f"{metric}_mean"]):
        return "n/a"  # not measured (a sweep on meta-val runs no meta-test)
    if mean is None or math.isnan(mean):
        return "no shared seed"
    text = f"{mean:+.2f}" + ("" if math.isnan(half) else f" ± {half:.2f}")
    return text + ("" if math.isnan(p) else f" (p {p:.3f})")


def cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The header and the text cells of the summary (differences when a reference was chosen)."""
    diffs = any("reference" in r for r in rows)
    head = HEAD + (DIFF_HEAD if diffs else [])
    body = []
    for r in rows:
        line = [r["setting"], str(r["n"]), r["seeds"], _ci(r["val_mean"], r["val_ci"]),
                _ci(r["test_mean"], r["test_ci"])]
        body.append(line + ([_diff(r, "val"), _diff(r, "test")] if diffs else []))
    return head, body


def text_table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns for the terminal; intervals are 95% t-intervals over the seeds."""
    head, body = cells(rows)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`cells`."""
    head, body = cells(rows)
    lines = ["| " + " | ".join(line) + " |" for line in [head, *body]]
    lines.insert(1, "|" + "---|" * len(head))
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The rows' numbers, unrounded (empty where there is none)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
    return out.getvalue()


PANELS = (("val", 1, "meta-val (best)"), ("test", 2, "meta-test"))


def plot(runs: list[Run], rows: list[dict[str, Any]], path: Path) -> None:
    """Meta-val and meta-test per setting: one dot per seed, the mean with its 95% interval.

    Settings run down the y-axis, so that long labels stay readable; a metric no run has (a
    sweep chosen on meta-val, meta-test untouched) gets no panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = seed_points(runs)
    panels = [panel for panel in PANELS if any(p[panel[1]] is not None for _, points in groups for p in points)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 3.5, 0.45 * len(groups) + 1.4),
                             sharey=True, squeeze=False)
    for ax, (metric, index, title) in zip(axes[0], panels, strict=True):
        for y, ((_, points), row) in enumerate(zip(groups, rows, strict=True)):
            xs = [p[index] for p in points if p[index] is not None]
            ax.scatter(xs, [y + 0.12] * len(xs), s=14, color="0.55", zorder=2, label="seed" if y == 0 else None)
            half = row[f"{metric}_ci"]
            ax.errorbar([row[f"{metric}_mean"]], [y - 0.12], xerr=None if math.isnan(half) else [[half], [half]],
                        fmt="o", color="C0", capsize=4, zorder=3, label="mean ± 95% t-interval" if y == 0 else None)
        ax.set_yticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
        ax.set_ylim(len(groups) - 0.5, -0.5)  # the table's order, top to bottom
        ax.set_title(title)
        ax.set_xlabel("accuracy %")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_files(runs: list[Run], rows: list[dict[str, Any]], folder: Path) -> dict[str, Path]:
    """``summary.md``, ``summary.csv`` and ``summary.png`` in ``folder``; their paths by kind."""
    files = {"markdown": folder / "summary.md", "csv": folder / "summary.csv", "plot": folder / "summary.png"}
    write_text(files["markdown"], markdown(rows))
    write_text(files["csv"], csv_text(rows))
    plot(runs, rows, files["plot"])
    return files
