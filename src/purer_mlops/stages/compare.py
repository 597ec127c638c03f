"""The comparison table: methods × shots on the same fixed meta-test tasks.

Methods (see docs/compare.md): ``random`` (fresh meta-model, adapted by the inner loop),
``average`` (the teachers' parameter average; homogeneous pools only), ``ei`` (PURER
without the curriculum switch), ``purer`` (ECI), ``purer+icfil`` and ``oracle`` (the same
meta-learner meta-trained on the real meta-train images with the same budget: an upper
bound, not data-free), and the teachers' own embeddings with a nearest-prototype head
(``teacher-best``, ``teacher-mean``, ``teachers-ensemble``: :mod:`.meta.baselines`). Every
meta-model also gets a ``<method>+proto`` row: nearest prototype on its own embedding
(:mod:`.meta.heads`), its second head. Every method is scored on the same tasks, so
differences are paired.

Trained models live in ``models/compare/<method>-<shot>shot/`` and are reused when their
parameters have not changed; the main pipeline's ``models/meta`` is reused for the PURER
row whose parameters it was trained with. Each method × shot is one child run of the
comparison's MLflow run.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from ..config import Params
from ..data.dataset import ImageSet, TaskIndices
from ..fileio import write_json, write_text
from ..meta.baselines import TEACHER_METHODS, TeacherRows
from ..meta.checkpoint import fingerprint, load_model, matching_resume_state
from ..meta.heads import prototype_accuracies
from ..meta.pool import init_meta_model, load_teachers
from ..meta.scoring import fixed_test_tasks, paired, score, summary
from ..paths import Project
from ..tracking import Tracker, open_tracker
from . import metatrain as train
from .compare_report import bar_chart, table_markdown

TRAINED = {"ei": {"eci": False}, "purer": {}, "oracle": {}}
PAIRS = (("purer", "random"), ("purer", "average"), ("purer", "ei"), ("purer+icfil", "purer"), ("oracle", "purer"),
         ("purer", "teacher-best"), ("purer", "teachers-ensemble"), ("teachers-ensemble", "teacher-best"))


class Column(NamedTuple):
    """What every row of one column shares: meta_test, its fixed tasks, the teachers' rows."""

    test: ImageSet
    tasks: list[TaskIndices]
    teachers: TeacherRows


def shot_params(params: Params, shot: int) -> Params:
    """The parameters of the ``shot``-shot column: train and test with ``shot`` supports."""
    per_class = max(params.synthesis_per_class, shot + params.num_qur_train)
    return params.replace(num_sup_train=shot, num_sup_test=shot, synthesis_per_class=per_class)


def trained_model(method: str, p: Params, project: Project, progress: bool, tracker: Tracker) -> torch.nn.Module:
    """Meta-train (or reuse) the model of ``method`` for the column parameters ``p``."""
    p = p.replace(**TRAINED[method])
    oracle = method == "oracle"
    if method == "purer":  # the main pipeline's model, when it was trained with these parameters
        state = matching_resume_state(project.meta.resume_state, fingerprint(p, project.teachers, oracle))
        if state is not None and state["iteration"] == p.meta_iterations:
            return load_model(project.meta.best)[0]
    name = f"{method}-{p.num_sup_train}shot"
    files = train.RunFiles(project.compare_models(name), project.results("compare") / "runs" / name)
    train.run(p, project, files=files, oracle=oracle, progress=progress, tracker=tracker, reuse_complete=True)
    return load_model(files.models.best)[0]


def start_model(method: str, p: Params, project: Project) -> torch.nn.Module | None:
    """The untrained baselines; None when ``average`` cannot be formed from this pool."""
    size = p.image_size(p.dataset)
    if method == "random":
        return init_meta_model(p.replace(average=False), None, size)
    pool = load_teachers(project.teachers)
    if pool.averaging_blocker(p.backbone, size):
        return None
    return init_meta_model(p.replace(average=True), pool, size)


def method_model(method: str, p: Params, project: Project, progress: bool, tracker: Tracker
                 ) -> torch.nn.Module | None:
    """The meta-model of one row at the column parameters ``p``."""
    if method in ("random", "average"):
        return start_model(method, p, project)
    return trained_model(method.removesuffix("+icfil"), p, project, progress, tracker)


def score_method(method: str, p: Params, project: Project, column: Column, progress: bool, tracker: Tracker
                 ) -> dict[str, torch.Tensor | str]:
    """The row(s) of ``method``: name → per-task accuracies (T,), or a note when it is n/a.

    A meta-model gives two rows, its test-time adaptation and ``<method>+proto`` (nearest
    prototype on its embedding).
    """
    test, tasks = column.test, column.tasks
    if method in TEACHER_METHODS:
        scores = column.teachers.scores()
        return {method: scores if isinstance(scores, str) else scores.accuracies(method)}
    model = method_model(method, p, project, progress, tracker)
    if model is None:
        return {method: "pool not homogeneous in the meta-model's architecture"}
    icfil = method.endswith("+icfil")
    scores = score(p, model, test, tasks, meta_learner=p.meta_learner, icfil=icfil, progress=progress)
    out: dict[str, torch.Tensor | str] = {method: scores}
    if not icfil:  # the same model as its plain row: same prototype head
        out[f"{method}+proto"] = prototype_accuracies(model, test, tasks)
    return out


def score_column(params: Params, shot: int, project: Project, progress: bool, tracker: Tracker
                 ) -> tuple[list[dict], list[dict]]:
    """Rows (one or two per method) and paired differences of the ``shot``-shot column."""
    p = shot_params(params, shot)
    test, tasks = fixed_test_tasks(p, project, shot)
    column = Column(test, tasks, TeacherRows(p, project, test, tasks))
    rows, accs = [], {}
    for method in params.compare.methods:
        with tracker.child(f"{method}-{shot}shot", {"method": method, "shot": shot}) as child:
            for name, result in score_method(method, p, project, column, progress, child).items():
                if isinstance(result, str):
                    rows.append({"method": name, "shot": shot, "accuracy": None, "ci95": None, "note": result})
                    continue
                accs[name] = result
                rows.append({"method": name, "shot": shot, **summary(result), **teacher_note(name, column.teachers)})
                key = "test_prototype" if name.endswith("+proto") else "test"
                child.log_metrics({f"{key}_accuracy": rows[-1]["accuracy"], f"{key}_ci95": rows[-1]["ci95"]})
    pairs = [*PAIRS, *((f"{m}+proto", m) for m in params.compare.methods)]
    diffs = [{"shot": shot, "a": a, "b": b, **paired(accs[a], accs[b])} for a, b in pairs if a in accs and b in accs]
    return rows, diffs


def teacher_note(method: str, teachers: TeacherRows) -> dict[str, str]:
    """``{"note": ...}`` for a teacher row (which teacher, its meta-val accuracy); {} otherwise."""
    return {"note": teachers.scores().note(method)} if method in TEACHER_METHODS else {}


def run(params: Params, project: Project, *, progress: bool = True, tracker: Tracker | None = None) -> dict:
    """Score every method of ``compare.methods`` at every shot of ``compare.shots``."""
    tracker = tracker or Tracker()
    started = time.perf_counter()
    out = project.results("compare")
    rows: list[dict] = []
    diffs: list[dict] = []
    for shot in params.compare.shots:
        column, paired_diffs = score_column(params, shot, project, progress, tracker)
        rows += column
        diffs += paired_diffs
    md = table_markdown(rows, list(params.compare.shots), params.way_test)
    md += "\nPaired differences on shared tasks (percentage points, 95% interval):\n\n"
    md += "| shot | a − b | difference |\n|---|---|---|\n"
    md += "".join(f"| {d['shot']} | {d['a']} − {d['b']} | {d['difference']:+.2f} ± {d['ci95']:.2f} |\n"
                  for d in diffs)
    notes = [f"- {r['method']}, {r['shot']}-shot: {r['note']}\n" for r in rows if r.get("note")]
    md += "\nNotes:\n\n" + "".join(notes) if notes else ""
    write_json(out / "compare.json", rows)
    write_json(out / "paired.json", diffs)
    write_text(out / "compare.md", md)
    bar_chart(rows, out / "compare.png")
    for path in ("compare.json", "paired.json", "compare.md", "compare.png"):
        tracker.log_artifact(out / path)
    return {"rows": rows, "paired": diffs, "wall_seconds": round(time.perf_counter() - started, 2)}


def main(params: Params, project: Project, progress: bool = True) -> dict:
    """The stage as ``purer compare`` runs it: :func:`run` inside its MLflow run."""
    with open_tracker(params, "compare", project.root) as tracker:
        return run(params, project, progress=progress, tracker=tracker)
