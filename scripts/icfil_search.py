"""Choose ICFIL's calibration knobs on meta-val; then meta-test the choice once, with its ablation.

    python scripts/icfil_search.py search --project /path/to/trained/project --tasks 150
    python scripts/icfil_search.py test   --project /path/to/trained/project --tasks 600

``search`` scores a small, fixed list of configurations (below) on ``--tasks`` FIXED meta-val
tasks (seed ``--seed``) at 1 and 5 shots, each as a paired difference against plain
test-time adaptation on the same tasks, and writes ``<out>/search.csv``, ``search.md`` and
``chosen.json``: the configuration with the largest 1-shot gain among those whose 5-shot
gain is not negative. ``test`` reads ``chosen.json`` and scores it on the fixed meta-test
tasks of ``metatest.seed``, then the full formulation (every synthesis term on, ``FULL``) and
the same with each part switched off in turn (the ablation), writing ``test.csv`` and
``test.md``. The meta-model is the project's ``models/meta/best``; the other knobs are this
checkout's ``params.yaml``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path

import torch

from purer_mlops.config import Params
from purer_mlops.config.loading import load_params
from purer_mlops.data.dataset import fixed_tasks, load_split
from purer_mlops.fileio import write_json, write_text
from purer_mlops.meta.checkpoint import load_model
from purer_mlops.meta.scoring import paired, score, summary
from purer_mlops.paths import Project

# name -> calibration overrides. F1 reproduces the old formulation's spirit (pseudo images
# confirmed by the adapted model); F2-F4 make them hard, diverse, with the support's
# BatchNorm statistics, and calibrate more and more of the model; the rest vary F2-F4's
# calibration strength and the synthesis effort.
HARD = {"hard_weight": 1.0, "feature_weight": 1.0, "diversity_weight": 0.5, "bn_weight": 0.1}
CHEAP = {"images_per_class": 2, "inversion_steps": 5}  # within the 3x cost budget (docs/icfil.md)
CONFIGS: dict[str, dict] = {
    "F0 noisy copies, head": {"images_per_class": 2, "inversion_steps": 0, "calibrate": "head", "calibration_steps": 10,
                              "calibration_lr": 0.1},
    "F1 confirm, head": {"hard_weight": -1.0, "feature_weight": 1.0, **CHEAP,
                         "calibrate": "head", "calibration_steps": 10, "calibration_lr": 0.1},
    "F2 hard, head": {**HARD, **CHEAP, "calibrate": "head", "calibration_steps": 10,
                      "calibration_lr": 0.1},
    "F3 hard, last block": {**HARD, **CHEAP, "calibrate": "last", "calibration_steps": 5,
                            "calibration_lr": 0.05},
    "F4 hard, all": {**HARD, **CHEAP, "calibrate": "all", "calibration_steps": 5,
                     "calibration_lr": 0.02},
    # second round: F0 and F1 lost 1-3 points at 10 head steps of lr 0.1, so calibrate gently
    "G2 hard, head, lr 0.03": {**HARD, **CHEAP, "calibrate": "head", "calibration_steps": 5,
                               "calibration_lr": 0.03, "pseudo_weight": 1.0},
    "G2 hard, head, w 2": {**HARD, **CHEAP, "calibrate": "head", "calibration_steps": 10,
                           "calibration_lr": 0.01, "pseudo_weight": 2.0},
    "G3 hard, last, lr 0.01": {**HARD, **CHEAP, "calibrate": "last", "calibration_steps": 3,
                               "calibration_lr": 0.01, "pseudo_weight": 1.0},
    "G4 hard, all, lr 0.005": {**HARD, **CHEAP, "calibrate": "all", "calibration_steps": 3,
                               "calibration_lr": 0.005, "pseudo_weight": 1.0},
    # third round: at inversion lr 0.1 Adam moves every pixel by up to 0.5 (normalised units) in
    # 5 steps, more than the fidelity term holds: pseudo images that stay in their class need less
    "H2 hard, head, inv lr 0.01": {**HARD, **CHEAP, "inversion_lr": 0.01, "calibrate": "head",
                                   "calibration_steps": 10, "calibration_lr": 0.01, "pseudo_weight": 2.0},
    "H4 hard, all, inv lr 0.01": {**HARD, **CHEAP, "inversion_lr": 0.01, "calibrate": "all",
                                  "calibration_steps": 3, "calibration_lr": 0.005, "pseudo_weight": 1.0},
}


def calibration_of(base: Params, overrides: dict) -> Params:
    """``base`` with ICFIL on and the calibration overrides applied."""
    return base.replace(icfil=True, **{f"calibration.{k}": v for k, v in overrides.items()})


def score_many(params: Params, model: torch.nn.Module, imageset, tasks, configs: dict[str, dict],
               shot: int) -> list[dict]:
    """Plain and ICFIL accuracies of each configuration on the same tasks: one row per configuration."""
    p = params.replace(num_sup_test=shot)
    started = time.perf_counter()
    plain = score(p, model, imageset, tasks, meta_learner=p.meta_learner)
    plain_s = time.perf_counter() - started
    rows = [{"config": "plain", "shot": shot, **_fmt(summary(plain)), "difference": 0.0, "diff_ci95": 0.0,
             "seconds": round(plain_s, 1), "cost_ratio": 1.0, "knobs": "{}"}]
    for name, overrides in configs.items():
        started = time.perf_counter()
        accs = score(calibration_of(p, overrides), model, imageset, tasks, meta_learner=p.meta_learner, icfil=True)
        secs = time.perf_counter() - started
        gain = paired(accs, plain)
        rows.append({"config": name, "shot": shot, **_fmt(summary(accs)),
                     "difference": round(gain["difference"], 3), "diff_ci95": round(gain["ci95"], 3),
                     "seconds": round(secs, 1), "cost_ratio": round((plain_s + secs) / plain_s, 2),
                     "knobs": json.dumps(overrides, sort_keys=True)})
        print(f"{shot}-shot {name}: {rows[-1]['difference']:+.2f} ± {rows[-1]['diff_ci95']:.2f} "
              f"({secs:.0f} s)", flush=True)
    return rows


def _fmt(s: dict) -> dict:
    return {"accuracy": round(s["accuracy"], 2), "ci95": round(s["ci95"], 2), "episodes": s["episodes"]}


def markdown(rows: list[dict], title: str) -> str:
    """The rows as a markdown table."""
    head = "| configuration | shot | accuracy (%) | paired difference (points) | s | cost × |"
    lines = [f"### {title}", "", head, "|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['shot']} | {r['accuracy']:.2f} ± {r['ci95']:.2f} | "
              f"{r['difference']:+.2f} ± {r['diff_ci95']:.2f} | {r['seconds']} | {r['cost_ratio']} |" for r in rows]
    return "\n".join(lines) + "\n"


def choose(rows: list[dict]) -> str:
    """The configuration with the largest 1-shot gain among those whose 5-shot gain is not negative."""
    five = {r["config"]: r["difference"] for r in rows if r["shot"] == 5}
    ones = [r for r in rows if r["shot"] == 1 and r["config"] != "plain" and five.get(r["config"], 0.0) >= 0.0]
    return max(ones, key=lambda r: r["difference"])["config"] if ones else "plain"


def merged(out: Path, stem: str, rows: list[dict]) -> list[dict]:
    """``rows`` plus the rows of an earlier ``<stem>.csv`` for configurations not scored again."""
    path = out / f"{stem}.csv"
    if not path.is_file():
        return rows
    again = {(r["config"], r["shot"]) for r in rows}
    with path.open() as f:
        old = [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return [r for r in old if (r["config"], r["shot"]) not in again] + rows


def _num(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def write_rows(out: Path, stem: str, rows: list[dict], title: str) -> None:
    """``<stem>.csv`` and ``<stem>.md`` under ``out``."""
    rows = sorted(rows, key=lambda r: (r["shot"], r["config"] != "plain", r["config"]))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / f"{stem}.csv", text.getvalue())
    write_text(out / f"{stem}.md", markdown(rows, title))


FULL = "G3 hard, last, lr 0.01"  # every synthesis term on: the formulation the ablation takes apart


def test_configs(chosen: dict) -> dict[str, dict]:
    """The chosen configuration, then the full formulation (``FULL``) with each part off in turn."""
    full = CONFIGS[FULL]
    off = {"hard term off": {"hard_weight": 0.0}, "fidelity term off": {"feature_weight": 0.0},
           "diversity term off": {"diversity_weight": 0.0}, "BatchNorm prior off": {"bn_weight": 0.0},
           "no inversion (noisy copies)": {"inversion_steps": 0}, "no pseudo data (w = 0)": {"pseudo_weight": 0.0}}
    out = {"chosen": chosen, "all terms (G3)": full}
    out.update({f"G3, {name}": {**full, **change} for name, change in off.items()})
    return {k: v for i, (k, v) in enumerate(out.items()) if i == 0 or v != chosen}


def combine(parts: list[Path], out: Path) -> None:
    """Merge the tables of ``parts`` into ``out`` (and choose again from the merged search table)."""
    for stem in ("search", "test"):
        rows: list[dict] = []
        for part in parts:
            if (part / f"{stem}.csv").is_file():
                rows = merged(part, stem, rows)
        if rows:
            title = (part / f"{stem}.md").read_text().splitlines()[0].removeprefix("### ")
            write_rows(out, stem, rows, title)
            if stem == "search":
                write_choice(out, rows)


def write_choice(out: Path, rows: list[dict]) -> None:
    """``chosen.json``: the chosen configuration's name and calibration knobs."""
    name = choose(rows)
    knobs = next((json.loads(r["knobs"]) for r in rows if r["config"] == name), {})
    write_json(out / "chosen.json", {"name": name, "calibration": knobs})
    print(f"chosen: {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("search", "test", "combine"))
    ap.add_argument("--project", type=Path, help="project holding models/meta/best and data/ (search, test)")
    ap.add_argument("--tasks", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0, help="seed of the fixed meta-val tasks (search)")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--only", nargs="*", help="score only these configurations (or ablation rows)")
    ap.add_argument("--out", type=Path, default=Path("results/icfil"))
    ap.add_argument("--parts", type=Path, nargs="*", default=[],
                    help="combine: folders whose search.csv/test.csv (e.g. one per shot, run in parallel) to merge")
    args = ap.parse_args()
    if args.mode == "combine":
        combine(args.parts, args.out)
        return
    if args.project is None:
        ap.error(f"{args.mode} needs --project")
    params = load_params("params.yaml")
    project = Project(args.project)
    model, _ = load_model(project.meta.best, "cpu")
    split = "meta_val" if args.mode == "search" else "meta_test"
    imageset = load_split(params.dataset, project.dataset(params.dataset), split)
    seed = args.seed if args.mode == "search" else params.metatest.seed
    if args.mode == "search":
        configs = CONFIGS
    else:
        configs = test_configs(json.loads((args.out / "chosen.json").read_text())["calibration"])
    configs = {k: v for k, v in configs.items() if not args.only or k in args.only}
    rows = []
    for shot in args.shots:
        tasks = fixed_tasks(imageset, args.tasks, params.way_test, shot, params.num_qur_test, seed=seed)
        rows += score_many(params, model, imageset, tasks, configs, shot)
    stem = "search" if args.mode == "search" else "test"
    rows = merged(args.out, stem, rows)
    write_rows(args.out, stem, rows, f"{split}, {args.tasks} fixed tasks (seed {seed})")
    if args.mode == "search":
        write_choice(args.out, rows)


if __name__ == "__main__":
    main()
