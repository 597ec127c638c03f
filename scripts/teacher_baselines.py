"""The teacher baselines and both heads of the project's meta-model, with paired intervals.

    python scripts/teacher_baselines.py forms --project P            # meta-val: cosine vs euclidean
    python scripts/teacher_baselines.py test  --project P --shots 1 5  # meta-test: the rows

``forms`` scores, on the fixed meta-val tasks that meta-training selects on
(purer_mlops.meta.baselines.meta_val_tasks), each head form (purer_mlops.meta.heads.FORMS):
the teachers one by one (mean, best), their ensemble and the meta-model's embedding. This is
where the default form was chosen. ``test`` scores, on the ``episode_test`` fixed meta-test
tasks (``metatest.seed``) at each shot, the meta-model's test-time adaptation and its
nearest-prototype head, and the rows ``teacher-best``, ``teacher-mean`` and
``teachers-ensemble`` exactly as ``purer compare`` does (the same library code), with paired
differences. The meta-model is the project's ``models/meta/best``, whatever shot it was
trained at. Both print a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from purer_mlops.config.loading import load_params
from purer_mlops.data.dataset import load_split
from purer_mlops.meta.baselines import TEACHER_METHODS, TeacherRows, meta_val_tasks, teacher_accuracies
from purer_mlops.meta.checkpoint import load_model
from purer_mlops.meta.heads import FORMS, prototype_accuracies
from purer_mlops.meta.scoring import fixed_test_tasks, paired, score, summary
from purer_mlops.models.pool_storage import load_pool
from purer_mlops.paths import Project


def cell(accs: torch.Tensor) -> str:
    s = summary(accs)
    return f"{s['accuracy']:.2f} ± {s['ci95']:.2f}"


def forms(params, project: Project, model: torch.nn.Module, shots: list[int]) -> list[str]:
    """Rows: per shot and form, the teachers' mean and best, their ensemble, the meta-model's head (meta-val)."""
    val = load_split(params.dataset, project.dataset(params.dataset), "meta_val")
    pool = load_pool(project.teachers)
    lines = ["| shot | form | teachers' mean | best teacher | ensemble | meta-model head |",
             "|---|---|---|---|---|---|"]
    for shot in shots:
        tasks = meta_val_tasks(params, val, shot)
        for form in FORMS:
            each, ensemble = teacher_accuracies(pool, val, tasks, form)
            best = int(each.mean(1).argmax())
            head = prototype_accuracies(model, val, tasks, form)
            lines.append(f"| {shot} | {form} | {cell(each.mean(0))} | {pool[best][0].name} {cell(each[best])} | "
                         f"{cell(ensemble)} | {cell(head)} |")
            print(lines[-1], flush=True)
    return lines


def test(params, project: Project, model: torch.nn.Module, shots: list[int]) -> list[str]:
    """Rows: per shot, both heads of the meta-model and the teacher rows (meta-test), paired to PURER."""
    lines = ["| shot | row | accuracy | vs meta-model adaptation (paired) | note |", "|---|---|---|---|---|"]
    for shot in shots:
        p = params.replace(num_sup_test=shot)
        test_set, tasks = fixed_test_tasks(p, project, shot)
        started = time.perf_counter()
        rows = {"meta-model, adaptation": score(p, model, test_set, tasks, meta_learner=p.meta_learner),
                "meta-model, nearest prototype": prototype_accuracies(model, test_set, tasks)}
        teachers = TeacherRows(p, project, test_set, tasks).scores()
        if isinstance(teachers, str):
            raise SystemExit(teachers)
        rows.update({m: teachers.accuracies(m) for m in TEACHER_METHODS})
        base = rows["meta-model, adaptation"]
        for name, accs in rows.items():
            d = paired(accs, base)
            note = teachers.note(name) if name in TEACHER_METHODS else ""
            lines.append(f"| {shot} | {name} | {cell(accs)} | {d['difference']:+.2f} ± {d['ci95']:.2f} | {note} |")
            print(lines[-1], flush=True)
        print(f"{shot}-shot: {time.perf_counter() - started:.0f} s", flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("forms", "test"))
    ap.add_argument("--project", type=Path, default=Path("."), help="project holding models/ and data/")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    args = ap.parse_args()
    params, project = load_params(args.params), Project(args.project)
    model, _ = load_model(project.meta.best, "cpu")
    lines = (forms if args.mode == "forms" else test)(params, project, model, args.shots)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
