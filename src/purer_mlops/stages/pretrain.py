"""Stage ``pretrain``: train the teacher pool (:mod:`purer_mlops.teachers.training`) into
``models/teachers/``, and write ``results/pretrain/metrics.json`` (the pool's mean and worst, see
:mod:`.headline`), ``details.json`` (per teacher, wall time) and the per-teacher table
``results/pretrain/teachers.md`` (:mod:`purer_mlops.teachers.pool_table`), whose quality check can
fail the stage. Under ``torchrun`` the teachers are spread over the ranks.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..config import Params
from ..data.dataset import ImageSet, load_split
from ..distributed import SINGLE, Ranks, pick_device, setup, teardown
from ..fileio import write_text
from ..models.pool_storage import TeacherRecord, save_pool
from ..paths import Project
from ..teachers.augment import augmentation_knobs
from ..teachers.pool_table import TeacherRow, check_quality, format_table
from ..teachers.training import TeacherSpec, TrainedTeacher, plan_pool, trained_teachers
from . import headline


def _summary(accs: list[float]) -> dict:
    return {"teachers": len(accs), "acc_mean": sum(accs) / len(accs), "acc_min": min(accs),
            "acc_max": max(accs)}


def pool_metrics(rows: list[TeacherRow]) -> dict:
    """Held-out accuracy mean/min/max overall, ``by_arch``, ``by_dataset``, and ``by_teacher``."""
    metrics = _summary([r.accuracy for r in rows])
    for key in ("arch", "dataset"):
        groups: dict[str, list[float]] = {}
        for r in rows:
            groups.setdefault(getattr(r, key), []).append(r.accuracy)
        metrics[f"by_{key}"] = {k: _summary(v) for k, v in groups.items()}
    metrics["by_teacher"] = {r.name: r.metrics() for r in rows}
    return metrics


def _reported(pairs: Iterable[tuple[TeacherRow, TeacherRecord, dict[str, torch.Tensor]]], rows: list[TeacherRow],
              params: Params, results: Path, knobs: dict[str, str] | None
              ) -> Iterator[tuple[TeacherRecord, dict[str, torch.Tensor]]]:
    """Pass the pool on to :func:`save_pool`, collecting its rows in ``rows``; once every teacher
    is through, print and write the table and apply the quality check (its message names ``knobs``,
    the augmentation in force per dataset). Raising here, inside the
    stream, makes ``save_pool`` drop the new folder and keep the previous pool."""
    min_accuracy = params.pretrain.min_accuracy
    for row, record, state in pairs:
        rows.append(row)
        yield record, state
    table = results / "teachers.md"
    print(format_table(rows, min_accuracy, names=False), file=sys.stderr, end="")
    low = any(r.accuracy < min_accuracy for r in rows)
    note = ("\n**Failed:** teachers below pretrain.min_accuracy; models/teachers/ was not replaced.\n"
            if low else "")
    write_text(table, "# Teacher pool\n\n" + format_table(rows, min_accuracy) + note)
    check_quality(rows, min_accuracy, str(Path("results") / "pretrain" / table.name), knobs)


def _described(spec: TeacherSpec, imageset: ImageSet, t: TrainedTeacher
               ) -> tuple[TeacherRow, TeacherRecord, dict[str, torch.Tensor]]:
    """The table row, the pool record and the weights of one trained teacher."""
    classes = tuple(imageset.classes[c] for c in spec.class_ids)
    record = TeacherRecord(arch=spec.arch, dataset=spec.dataset, image_size=imageset.image_size,
                           mean=imageset.mean, std=imageset.std, classes=classes,
                           class_ids=spec.class_ids, accuracy=t.accuracy)
    row = TeacherRow(name=f"teacher_{spec.index:03d}", arch=spec.arch, dataset=spec.dataset,
                     class_ids=spec.class_ids, classes=classes, accuracy=t.accuracy,
                     best_epoch=t.best_epoch, epochs=t.epochs, steps=t.steps, restarts=t.restarts)
    return row, record, t.state


def run(params: Params, project: Project, progress: bool = True,
        device: str | torch.device = "cpu", ranks: Ranks = SINGLE) -> dict:
    """Train the pool into ``models/teachers``; write ``results/pretrain/metrics.json``,
    ``details.json`` and the table ``teachers.md`` beside them (also printed to stderr).

    Returns the details: :func:`pool_metrics` and ``wall_seconds`` of the whole stage. A
    teacher below ``pretrain.min_accuracy`` raises a :class:`UserError` after the table is
    written; the previous pool and metrics stay. Under ``torchrun`` rank r trains teachers
    r, r + N, ... (they are independent and seeded by their index, so the pool is the one a
    single process trains); rank 0 gathers and writes them.
    """
    start = time.perf_counter()
    sets = {d: load_split(d, project.dataset(d), "meta_train", progress=progress) for d in params.teacher_datasets}
    specs = plan_pool(params, {d: len(s.classes) for d, s in sets.items()})
    show = progress and ranks.is_main
    if ranks.active:
        mine = [s for i, s in enumerate(specs) if i % ranks.world == ranks.rank]
        local = {s.index: t for s, t in trained_teachers(mine, sets, params, device, show)}
        done = {k: v for part in ranks.gather(local) for k, v in part.items()}
        if not ranks.is_main:
            return {}
        triples = (_described(s, sets[s.dataset], done[s.index]) for s in specs)
    else:
        # one process: save_pool writes each teacher as soon as it is trained (one in memory)
        triples = (_described(s, sets[s.dataset], t) for s, t in trained_teachers(specs, sets, params, device, show))
    results = project.results("pretrain")
    rows: list[TeacherRow] = []
    knobs = ({d: augmentation_knobs(d, params, s.recolour) for d, s in sets.items()}  # named when teachers are weak
             if params.pretrain.recipe == "purer-mlops" else None)
    save_pool(project.teachers, _reported(triples, rows, params, results, knobs))
    metrics = pool_metrics(rows)
    metrics["wall_seconds"] = time.perf_counter() - start
    headline.write(results, metrics, headline.pretrain(metrics))
    return metrics


def main(params: Params, project: Project, progress: bool = True) -> dict:
    """The stage as ``purer pretrain`` runs it: on ``params.device``, teachers split across the
    ranks under ``torchrun``; the metrics (an empty dict on the ranks other than 0)."""
    ranks = setup()
    try:
        return run(params, project, progress=progress, device=pick_device(params.device), ranks=ranks)
    finally:
        teardown(ranks)
