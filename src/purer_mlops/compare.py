"""The comparison table: methods × shots on the same fixed meta-test tasks.

Methods (see docs/compare.md): ``random`` (fresh meta-model, adapted by the inner loop),
``average`` (the teachers' parameter average; homogeneous pools only), ``ei`` (PURER
without the curriculum switch), ``purer`` (ECI), ``purer+icfil`` and ``oracle`` (the same
meta-learner meta-trained on the real meta-train images with the same budget: an upper
bound, not data-free). Every method is scored on the same tasks, so differences are paired.

Trained models live in ``models/compare/<method>-<shot>shot/`` and are reused when their
parameters have not changed; the main pipeline's ``models/meta`` is reused for the PURER
row whose parameters it was trained with.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import Params
from .data.registry import DATASETS
from .fileio import write_json, write_text, write_with
from .meta import train
from .meta.metatest import fixed_test_tasks, paired, score, summary
from .tracking import Tracker

TRAINED = {"ei": {"eci": False}, "purer": {}, "oracle": {}}


def shot_params(params: Params, shot: int) -> Params:
    """The parameters of the ``shot``-shot column: train and test with ``shot`` supports."""
    per_class = max(params.synthesis_per_class, shot + params.num_qur_train)
    return params.replace(num_sup_train=shot, num_sup_test=shot, synthesis_per_class=per_class)


def trained_model(method: str, p: Params, root: Path, progress: bool, tracker: Tracker) -> torch.nn.Module:
    """Meta-train (or reuse) the model of ``method`` for the column parameters ``p``."""
    p = p.replace(**TRAINED[method])
    oracle = method == "oracle"
    main = root / "models" / "meta"
    last = main / "last.pt"
    if method == "purer" and last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=True)
        if state.get("fingerprint") == train.fingerprint(p, root / "models" / "teachers", False) \
                and state["iteration"] == p.meta_iterations:
            return train.load_model(main / "best")[0]
    name = f"{method}-{p.num_sup_train}shot"
    models_dir = root / "models" / "compare" / name
    train.run(p, root, models_dir=models_dir, results_dir=root / "results" / "compare" / "runs" / name,
              oracle=oracle, progress=progress, tracker=tracker, reuse_complete=True)
    return train.load_model(models_dir / "best")[0]


def start_model(method: str, p: Params, root: Path) -> torch.nn.Module | None:
    """The untrained baselines; None when ``average`` cannot be formed from this pool."""
    size = DATASETS[p.dataset].image_size
    if method == "random":
        return train.init_meta_model(p.replace(average=False), None, size)
    pool = train.load_teachers(root / "models" / "teachers")
    if set(pool.archs) != {p.backbone} or set(pool.image_sizes) != {size}:
        return None
    return train.init_meta_model(p.replace(average=True), pool, size)


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
    """Grouped bars (methods × shots) with 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = sorted({r["shot"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) * len(shots) + 2, 4))
    width = 0.8 / len(shots)
    for j, s in enumerate(shots):
        sel = [next((r for r in rows if r["method"] == m and r["shot"] == s), None) for m in methods]
        acc = [r["accuracy"] if r and r["accuracy"] is not None else 0.0 for r in sel]
        err = [r["ci95"] if r and r["ci95"] is not None else 0.0 for r in sel]
        ax.bar([i + j * width for i in range(len(methods))], acc, width, yerr=err, capsize=3, label=f"{s}-shot")
    ax.set_xticks([i + width * (len(shots) - 1) / 2 for i in range(len(methods))], methods)
    ax.set_ylabel("meta-test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def run(params: Params, root: Path, *, progress: bool = True, tracker: Tracker | None = None) -> dict:
    """Score every method of ``compare.methods`` at every shot of ``compare.shots``."""
    tracker = tracker or Tracker()
    started = time.perf_counter()
    out = root / "results" / "compare"
    rows: list[dict] = []
    diffs: list[dict] = []
    for shot in params.compare.shots:
        p = shot_params(params, shot)
        test, tasks = fixed_test_tasks(p, root, shot)
        accs: dict[str, torch.Tensor] = {}
        for method in params.compare.methods:
            if method in ("random", "average"):
                model = start_model(method, p, root)
            else:
                model = trained_model(method.removesuffix("+icfil"), p, root, progress, tracker)
            if model is None:
                rows.append({"method": method, "shot": shot, "accuracy": None, "ci95": None,
                             "note": "pool not homogeneous in the meta-model's architecture"})
                continue
            accs[method] = score(p, model, test, tasks, icfil=method.endswith("+icfil"), progress=progress)
            rows.append({"method": method, "shot": shot, **summary(accs[method])})
        for a, b in (("purer", "random"), ("purer", "average"), ("purer", "ei"),
                     ("purer+icfil", "purer"), ("oracle", "purer")):
            if a in accs and b in accs:
                diffs.append({"shot": shot, "a": a, "b": b, **paired(accs[a], accs[b])})
    way = params.way_test
    md = table_markdown(rows, list(params.compare.shots), way)
    md += "\nPaired differences on shared tasks (percentage points, 95% interval):\n\n"
    md += "| shot | a − b | difference |\n|---|---|---|\n"
    md += "".join(f"| {d['shot']} | {d['a']} − {d['b']} | {d['difference']:+.2f} ± {d['ci95']:.2f} |\n"
                  for d in diffs)
    write_json(out / "compare.json", rows)
    write_json(out / "paired.json", diffs)
    write_text(out / "compare.md", md)
    bar_chart(rows, out / "compare.png")
    for path in ("compare.json", "paired.json", "compare.md", "compare.png"):
        tracker.log_artifact(out / path)
    return {"rows": rows, "paired": diffs, "wall_seconds": round(time.perf_counter() - started, 2)}
