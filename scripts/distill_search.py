"""Search of the distillation knobs on META-VAL only: both heads of each meta-trained model.

    OMP_NUM_THREADS=1 python scripts/distill_search.py --project P --iterations 400 --seed 0 \\
        --config 'teacher+feat={"distill.start": "best_teacher", "distill.weight": 1.0}'

Each configuration (JSON overrides of params.yaml, dotted keys for sections) is meta-trained for
``--iterations`` meta-iterations on one thread (``lanes: 1``) from ``P``'s teachers, with no
tracking and nothing written under ``P``. The final meta-model is scored on ``--tasks`` fixed
meta-val tasks (seed ``--task-seed``; 5-way 1-shot, 15 queries) with both heads: its meta-learner's
own test-time adaptation (as meta-training's validation) and nearest prototype on its embedding.
Rows are appended to ``<out>/search.csv``; per-task accuracies to ``<out>/tasks/<name>_s<seed>.pt``
(for paired differences).

``--meta-test`` is for the setting already chosen on meta-val, once: the model is also scored on
meta-test's fixed tasks with the comparison table's two heads (``purer metatest``'s adaptation and
the cosine nearest-prototype head) and paired with the ``teacher-best`` row of the same tasks; rows
go to ``<out>/metatest.csv`` (with the meta-val scores, which must repeat the search's row).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from purer_mlops.config.loading import load_params
from purer_mlops.data.dataset import fixed_tasks, load_split
from purer_mlops.meta.baselines import TeacherRows
from purer_mlops.meta.evaluation import mean_ci95, task_accuracies
from purer_mlops.meta.heads import prototype_accuracies
from purer_mlops.meta.scoring import fixed_test_tasks, score
from purer_mlops.models.learners import build_learner
from purer_mlops.paths import Project
from purer_mlops.stages.metatrain import build_trainer

COLUMNS = ("name", "seed", "iterations", "own", "own_ci95", "proto", "proto_ci95", "train_seconds",
           "seconds_per_iteration", "start_teacher", "distill_last", "knobs")
TEST_COLUMNS = ("name", "seed", "iterations", "val_own", "val_proto", "test_own", "test_proto", "teacher_best",
                "teacher_best_acc", "own_minus_teacher_best",
                "proto_minus_teacher_best", "start_teacher", "knobs")


def heads(params, model, imageset, tasks) -> dict[str, torch.Tensor]:
    """Per-task accuracies (T,) of the meta-learner's own adaptation and of nearest prototype."""
    own = build_learner(params.meta_learner, model, params.test_inner_update_num, params.inner_lr)
    proto = build_learner("protonet", model, 0, 0.0)
    weights = dict(model.named_parameters())
    return {k: task_accuracies(learner, weights, imageset, tasks) for k, learner in (("own", own), ("proto", proto))}


def percent(accs: torch.Tensor) -> str:
    """'mean ± ci95' in percent of per-task accuracies (T,) or of paired differences."""
    mean, ci = mean_ci95(100 * accs)
    return f"{mean:.2f} ± {ci:.2f}"


def meta_test_row(params, project: Project, model: torch.nn.Module, tasks_file: Path) -> dict:
    """The comparison table's 1-shot heads of ``model`` on meta-test's fixed tasks, and the paired
    differences to ``teacher-best`` (chosen on meta-val with this run's seed) on the same tasks;
    the per-task accuracies (T,) of the three go to ``tasks_file``."""
    p = params.replace(num_sup_test=1)
    test, tasks = fixed_test_tasks(p, project, 1)
    own = score(p, model, test, tasks, meta_learner=p.meta_learner)
    proto = prototype_accuracies(model, test, tasks)
    teachers = TeacherRows(p, project, test, tasks).scores()
    best = teachers.accuracies("teacher-best")
    torch.save({"own": own, "proto": proto, "teacher-best": best}, tasks_file)
    return {"test_own": percent(own), "test_proto": percent(proto), "teacher_best": teachers.names[teachers.best],
            "teacher_best_acc": percent(best), "own_minus_teacher_best": percent(own - best),
            "proto_minus_teacher_best": percent(proto - best)}


def run_one(name: str, knobs: dict, args) -> dict:
    params = load_params(args.params).replace(**{"lanes": 1, "tracking": False, "seed": args.seed,
                                                 "episode_train": max(args.iterations, 1) * 4, **knobs})
    project = Project(args.project)
    trainer = build_trainer(params, project, device=torch.device("cpu"))
    started = time.perf_counter()
    for _ in range(params.meta_iterations if args.iterations > 0 else 0):
        trainer.step()
    secs = time.perf_counter() - started
    val = load_split(params.dataset, project.dataset(params.dataset), "meta_val")
    tasks = fixed_tasks(val, args.tasks, params.way_test, 1, params.num_qur_test, seed=args.task_seed)
    accs = heads(params, trainer.model, val, tasks)
    (args.out / "tasks").mkdir(parents=True, exist_ok=True)
    torch.save(accs, args.out / "tasks" / f"{name}_s{args.seed}.pt")
    (own, own_ci), (proto, proto_ci) = mean_ci95(accs["own"]), mean_ci95(accs["proto"])
    its = max(args.iterations, 0)
    if args.meta_test:
        tasks_file = args.out / "tasks" / f"{name}_s{args.seed}_meta_test.pt"
        return {"name": name, "seed": args.seed, "iterations": its, "val_own": round(100 * own, 2),
                "val_proto": round(100 * proto, 2), **meta_test_row(params, project, trainer.model, tasks_file),
                "start_teacher": trainer.start_teacher[0] if trainer.start_teacher else "",
                "knobs": json.dumps(knobs, sort_keys=True)}
    return {"name": name, "seed": args.seed, "iterations": its, "own": round(100 * own, 2),
            "own_ci95": round(100 * own_ci, 2), "proto": round(100 * proto, 2), "proto_ci95": round(100 * proto_ci, 2),
            "train_seconds": round(secs, 1), "seconds_per_iteration": round(secs / its, 4) if its else "",
            "start_teacher": trainer.start_teacher[0] if trainer.start_teacher else "",
            "distill_last": json.dumps(trainer.distiller.last if trainer.distiller else {}),
            "knobs": json.dumps(knobs, sort_keys=True)}


def paired_gap(out: Path, row: dict, ref: str) -> str:
    """Nearest-prototype accuracy of ``row`` minus ``ref``'s (same seed), paired over the tasks: 'd ± ci95'."""
    mine, theirs = out / "tasks" / f"{row['name']}_s{row['seed']}.pt", out / "tasks" / f"{ref}_s{row['seed']}.pt"
    if not (mine.is_file() and theirs.is_file()):
        return ""
    d, ci = mean_ci95(100 * (torch.load(mine)["proto"] - torch.load(theirs)["proto"]))
    return f"{d:+.2f} ± {ci:.2f}"


def table(out: Path, ref: str) -> None:
    """``<out>/search.md``: the rows of ``<out>/search.csv`` as a markdown table, with the paired
    nearest-prototype difference to the ``ref`` setting."""
    with (out / "search.csv").open() as f:
        rows = list(csv.DictReader(f))
    lines = [f"| setting | seed | iterations | own head % | nearest prototype % | proto − {ref} (paired) "
             "| s / iteration | knobs |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['seed']} | {r['iterations']} | {r['own']} ± {r['own_ci95']} | "
              f"{r['proto']} ± {r['proto_ci95']} | {paired_gap(out, r, ref)} | {r['seconds_per_iteration']} | "
              f"`{r['knobs']}` |" for r in rows]
    (out / "search.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, required=True, help="project holding data/ and models/teachers")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--task-seed", type=int, default=0)
    ap.add_argument("--config", nargs="*", default=[], help="'name={overrides as JSON}'")
    ap.add_argument("--table", action="store_true", help="only write <out>/search.md from <out>/search.csv")
    ap.add_argument("--reference", default="teacher-best-start", help="setting the table's paired column is against")
    ap.add_argument("--out", type=Path, default=Path("results/distill"))
    ap.add_argument("--meta-test", action="store_true", help="also score the chosen setting on meta-test, once")
    args = ap.parse_args()
    if args.table:
        table(args.out, args.reference)
        return
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path, columns = (args.out / "metatest.csv", TEST_COLUMNS) if args.meta_test else (args.out / "search.csv", COLUMNS)
    for spec in args.config:
        name, knobs = spec.split("=", 1)
        row = run_one(name, json.loads(knobs), args)
        print(json.dumps(row), flush=True)
        new = not path.is_file()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            if new:
                w.writeheader()
            w.writerow(row)


if __name__ == "__main__":
    main()
