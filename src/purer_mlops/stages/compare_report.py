"""The comparison table as people read it: a markdown table and a bar chart with intervals."""

from __future__ import annotations

from pathlib import Path

from ..fileio import write_with


def table_markdown(rows: list[dict], shots: list[int], way: int) -> str:
    """The paper-style table: one row per method, one column per shot, 'acc ± ci'."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["shot"]): r for r in rows}
    head = "| method | " + " | ".join(f"{way}-way {s}-shot" for s in shots) + " |"
    lines = [head, "|---" * (len(shots) + 1) + "|"]
    for m in methods:
        cells = []
        for s in shots:
            r = cell.get((m, s))
            cells.append("n/a" if r is None or r["accuracy"] is None else f"{r['accuracy']:.2f} ± {r['ci95']:.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], path: Path) -> None:
    """Grouped horizontal bars (methods down the y-axis in the table's order, one bar per shot)
    with 95% intervals as error bars: readable however many rows the table has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = sorted({r["shot"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(methods) * len(shots) + 1.2))
    height = 0.8 / len(shots)
    for j, s in enumerate(shots):
        sel = [next((r for r in rows if r["method"] == m and r["shot"] == s), None) for m in methods]
        acc = [r["accuracy"] if r and r["accuracy"] is not None else 0.0 for r in sel]
        err = [r["ci95"] if r and r["ci95"] is not None else 0.0 for r in sel]
        ax.barh([i + j * height for i in range(len(methods))], acc, height, xerr=err, capsize=2, label=f"{s}-shot")
    ax.set_yticks([i + height * (len(shots) - 1) / 2 for i in range(len(methods))], methods)
    ax.invert_yaxis()  # the table's first row on top
    ax.set_xlabel("meta-test accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
