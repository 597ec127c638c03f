"""ICFIL with the teachers' knowledge: how good their embeddings are, and calibrating on their labels.

    python scripts/icfil_teachers.py embeddings --project P --tasks 100 --shots 1
    python scripts/icfil_teachers.py calibrate  --project P --tasks 100 --shots 1 \\
        --config 'G3 teacher labels={"calibrate": "last", "calibration_steps": 3, "calibration_lr": 0.01}' \\
        --mixes 'mixes, head={"calibrate": "head", "calibration_steps": 10, "pseudo_weight": 0.5}'

``embeddings`` scores, on ``--tasks`` fixed meta-val tasks (seed 0, as ``icfil_search.py``),
each teacher's embedding as a cosine nearest-prototype classifier, the average of their
probabilities, and the meta-model with its test-time adaptation. ``calibrate`` runs ICFIL
whose pseudo images are fitted to the teachers' soft labels (the average over the pool of a
cosine nearest-prototype softmax, prototypes from the support) instead of their own class:
``--config`` with the pseudo images of the knobs (docs/icfil.md), ``--mixes`` with pseudo
images that mix two classes' support images (λ ~ U(0.5, 1), no inversion), where the teachers'
labels say how much of each class a mix shows. Rows are paired differences against plain
adaptation on the same tasks, appended to ``<out>/teachers.{csv,md}``. The teachers are the
project's ``models/teachers`` (they must share the dataset's image size and normalisation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from icfil_search import _fmt, calibration_of, merged, write_rows

from purer_mlops.config.loading import load_params
from purer_mlops.data.dataset import fixed_tasks, load_split
from purer_mlops.fileio import write_text
from purer_mlops.meta.baselines import space_blocker, teacher_accuracies
from purer_mlops.meta.checkpoint import load_model
from purer_mlops.meta.evaluation import task_accuracies
from purer_mlops.meta.heads import ensemble_probs, frozen_embed
from purer_mlops.meta.icfil import ICFIL
from purer_mlops.meta.icfil_synthesis import Synthesis
from purer_mlops.meta.scoring import paired, score, summary
from purer_mlops.models.learners import build_learner
from purer_mlops.models.pool_storage import load_pool
from purer_mlops.paths import Project


class TeacherICFIL(ICFIL):
    """ICFIL whose pseudo images are fitted to the teachers' soft labels: the mean over the pool of
    their cosine nearest-prototype probabilities (purer_mlops.meta.heads), prototypes from the support."""

    def __init__(self, *args, teachers: list[torch.nn.Module], **kwargs):
        super().__init__(*args, **kwargs)
        self.embeds = [frozen_embed(t) for t in teachers]

    def pseudo_targets(self, xs: torch.Tensor, x_hat: torch.Tensor, way: int) -> torch.Tensor:
        ys = torch.arange(way, device=xs.device).repeat_interleave(len(xs) // way)  # xs is in class order
        return ensemble_probs(self.embeds, xs[None], ys[None], x_hat[None], way, form="cosine")[0]


class Mixes(Synthesis):
    """Pseudo images of class c: λ·(support of c) + (1 − λ)·(support of another class), λ ~ U(0.5, 1)."""

    def run(self, base, adapted, xs, ys, noise, way):
        m, shot = len(noise) // way, len(xs) // way
        cls = torch.arange(way).repeat_interleave(m)
        other = (cls + 1 + torch.arange(way * m) % (way - 1)) % way
        gen = torch.Generator().manual_seed(self.cfg.images_per_class)  # fixed λ per configuration
        lam = 0.5 + 0.5 * torch.rand(way * m, 1, 1, 1, generator=gen)
        return lam.to(xs) * xs[cls * shot] + (1 - lam.to(xs)) * xs[other * shot]


def embeddings(params, model, pool, imageset, tasks, shot: int) -> list[dict]:
    """Accuracy rows: each teacher's nearest prototype, their ensemble, the adapted meta-model."""
    each, ensemble = teacher_accuracies(pool, imageset, tasks, form="cosine")
    rows = [{"config": f"{rec.name} nearest prototype", "shot": shot, **_fmt(summary(acc))}
            for (rec, _), acc in zip(pool, each, strict=True)]
    rows.append({"config": "teachers' ensemble", "shot": shot, **_fmt(summary(ensemble))})
    accs = score(params.replace(num_sup_test=shot), model, imageset, tasks, meta_learner=params.meta_learner)
    rows.append({"config": "meta-model (test-time adaptation)", "shot": shot, **_fmt(summary(accs))})
    return rows


def calibrations(params, model, teachers, imageset, tasks, shot: int, configs: dict, mixes: dict) -> list[dict]:
    """Paired rows: ICFIL on teacher labels, with inverted pseudo images (configs) or mixes."""
    p = params.replace(num_sup_test=shot)
    plain = score(p, model, imageset, tasks, meta_learner=p.meta_learner)
    rows = [{"config": "plain", "shot": shot, **_fmt(summary(plain)), "difference": 0.0, "diff_ci95": 0.0,
             "seconds": "", "cost_ratio": "", "knobs": "{}"}]
    learner = build_learner(p.meta_learner, model, p.test_inner_update_num, p.inner_lr, fast=True)
    weights = dict(model.named_parameters())
    for kind, group in (("", configs), (" [mixes]", mixes)):
        for name, overrides in group.items():
            cfg = calibration_of(p, overrides)
            icfil = TeacherICFIL(learner, cfg.calibration, cfg.inversion, cfg.metatest.seed, teachers=teachers)
            if kind:
                icfil.synthesis = Mixes(learner, cfg.calibration, cfg.inversion)
            started = time.perf_counter()
            accs = task_accuracies(learner, weights, imageset, tasks, predict=icfil.batch)
            gain = paired(accs, plain)
            secs = time.perf_counter() - started
            rows.append({"config": name + kind, "shot": shot, **_fmt(summary(accs)),
                         "difference": round(gain["difference"], 3), "diff_ci95": round(gain["ci95"], 3),
                         "seconds": round(secs, 1), "cost_ratio": "", "knobs": json.dumps(overrides, sort_keys=True)})
            print(f"{shot}-shot {name}{kind}: {gain['difference']:+.2f} ± {gain['ci95']:.2f} ({secs:.0f} s)",
                  flush=True)
    return rows


def named(specs: list[str]) -> dict[str, dict]:
    """'name={json knobs}' → {name: knobs}."""
    return {s.split("=", 1)[0]: json.loads(s.split("=", 1)[1]) for s in specs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("embeddings", "calibrate"))
    ap.add_argument("--project", type=Path, required=True, help="project holding models/ and data/")
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="seed of the fixed meta-val tasks")
    ap.add_argument("--shots", type=int, nargs="+", default=[1])
    ap.add_argument("--config", nargs="*", default=[], help="'name={calibration knobs as JSON}'")
    ap.add_argument("--mixes", nargs="*", default=[], help="'name={calibration knobs as JSON}', mixed pseudo images")
    ap.add_argument("--out", type=Path, default=Path("results/icfil"))
    args = ap.parse_args()
    params = load_params("params.yaml")
    project = Project(args.project)
    model, _ = load_model(project.meta.best, "cpu")
    imageset = load_split(params.dataset, project.dataset(params.dataset), "meta_val")
    pool = load_pool(project.teachers)
    blocker = space_blocker([r for r, _ in pool], imageset)
    if blocker:
        raise SystemExit(blocker)
    teachers = [t.eval() for _, t in pool]
    rows = []
    for shot in args.shots:
        tasks = fixed_tasks(imageset, args.tasks, params.way_test, shot, params.num_qur_test, seed=args.seed)
        if args.mode == "embeddings":
            rows += embeddings(params, model, pool, imageset, tasks, shot)
        else:
            rows += calibrations(params, model, teachers, imageset, tasks, shot, named(args.config), named(args.mixes))
    title = f"meta_val, {args.tasks} fixed tasks (seed {args.seed})"
    if args.mode == "calibrate":
        write_rows(args.out, "teachers_calibrate", merged(args.out, "teachers_calibrate", rows), title)
        return
    lines = [f"### {title}", "", "| classifier | shot | accuracy (%) |", "|---|---|---|"]
    lines += [f"| {r['config']} | {r['shot']} | {r['accuracy']:.2f} ± {r['ci95']:.2f} |" for r in rows]
    write_text(args.out / "teachers_embeddings.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
