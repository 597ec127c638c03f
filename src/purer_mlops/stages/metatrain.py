"""Stage ``metatrain``: build a :class:`~purer_mlops.meta.trainer.MetaTrainer` from the project, run its loop.

The loop is short; what happens around the iterations lives in named hooks: validation
(and model selection), the resumable checkpoint, the bank images. A run resumes from its
``last.pt`` when the fingerprint matches (:mod:`purer_mlops.meta.checkpoint`); under ``torchrun`` every rank
runs the loop on its share of the work and only rank 0 validates and writes. Ctrl-C or SIGTERM
(one process) end the current iteration, save the resumable state, then stop.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..config import Params
from ..data.dataset import load_split
from ..distributed import SINGLE, Ranks, pick_device, setup, teardown
from ..errors import UserError
from ..fileio import check_replaceable, read_json, write_csv, write_json, write_with
from ..interrupts import Interrupted, Pending, held
from ..lanes import ONE, Lanes, lane_count, open_lanes
from ..meta.checkpoint import (
    HISTORY_FOLDER,
    fingerprint,
    matching_resume_state,
    model_card,
    save_model,
    save_resume_state,
)
from ..meta.pool import load_teachers
from ..meta.trainer import TRAIN_COLUMNS, MetaTrainer
from ..paths import ModelDir, Project
from ..serve.registry import log_served_models
from ..tracking import Tracker, open_tracker
from . import headline

# Updates skipped in a row (non-finite losses or gradients) after which the run has diverged.
DIVERGED_AFTER = 20


def build_trainer(params: Params, project: Project, *, oracle: bool = False, device: torch.device | None = None,
                  ranks: Ranks = SINGLE, lanes: Lanes = ONE) -> MetaTrainer:
    """A trainer reading the pool, meta_val (and meta_train for the oracle) from ``project``."""
    data = project.dataset(params.dataset)
    val = load_split(params.dataset, data, "meta_val")
    val.check_task_shape(params.way_test, params.num_sup_test, params.num_qur_test,
                         ("way_test", "num_sup_test", "num_qur_test"))
    real = None
    if oracle:
        real = load_split(params.dataset, data, "meta_train")
        real.check_task_shape(params.way_train, params.num_sup_train, params.num_qur_train,
                              ("way_train", "num_sup_train", "num_qur_train"))
    pool = load_teachers(project.teachers)
    if params.candidate_size > len(pool.teachers) and not oracle:  # the oracle has no bank to update
        raise UserError(f"'candidate_size' is {params.candidate_size} but the pool in {project.teachers} has only "
                        f"{len(pool.teachers)} teachers; lower it to {len(pool.teachers)} or less (0: all of them).")
    return MetaTrainer(params, pool, val, device or pick_device(params.device), real=real, ranks=ranks, lanes=lanes)


def bank_grid(bank: torch.Tensor, mean, std, classes: int = 10, per_class: int = 8) -> np.ndarray:
    """An RGB uint8 grid (rows = classes, columns = images) of the first bank rows, denormalised."""
    x = bank[:classes, :per_class].detach().float().cpu()
    x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    c, p, _, s, _ = x.shape
    grid = x.clamp(0, 1).permute(0, 3, 1, 4, 2).reshape(c * s, p * s, 3)
    return (grid.numpy() * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class RunFiles:
    """Where one meta-training run writes: its model folder and its results folder."""

    models: ModelDir
    results: Path


class Checkpoints:
    """The resumable state (``last.pt``) with the curves, and the models a run keeps."""

    def __init__(self, trainer: MetaTrainer, files: RunFiles, fp: str):
        self.trainer, self.files, self.fp = trainer, files, fp

    def card(self, accuracy: float) -> dict:
        t = self.trainer
        return model_card(t.params, t.info.image_size, (t.info.mean, t.info.std), t.oracle, t.iteration, accuracy)

    def save_state(self) -> None:
        save_resume_state(self.files.models.resume_state, self.fp, self.trainer.state_dict())
        write_csv(self.files.results / "train.csv", self.trainer.history)
        write_csv(self.files.results / "val.csv", self.trainer.val_history)

    def save_validated(self, accuracy: float, is_best: bool) -> None:
        # Every validated model is kept (small) so metatest can also report the reference
        # code's optimistic protocol (best *test* accuracy over checkpoints), clearly labelled.
        card = self.card(accuracy)
        save_model(self.trainer.model, card, self.files.models.validated(self.trainer.iteration))
        if is_best:
            save_model(self.trainer.model, card, self.files.models.best)

    def save_last_model(self) -> None:
        save_model(self.trainer.model, self.card(self.trainer.val_history["val_accuracy"][-1]),
                   self.files.models.last)


class Validation:
    """Meta-validate the current model, record it, keep it (and as ``best`` when it is)."""

    def __init__(self, trainer: MetaTrainer, checkpoints: Checkpoints, tracker: Tracker):
        self.trainer, self.checkpoints, self.tracker = trainer, checkpoints, tracker

    def __call__(self) -> float:
        t = self.trainer
        acc = t.validate()
        t.val_history["iteration"].append(t.iteration)
        t.val_history["val_accuracy"].append(acc)
        self.tracker.log_metrics({"val_accuracy": acc}, step=t.iteration)
        is_best = acc > t.best["accuracy"]
        if is_best:
            t.best = {"accuracy": acc, "iteration": t.iteration}
        self.checkpoints.save_validated(acc, is_best)
        return acc


class BankImages:
    """A grid of the first bank rows: a PNG per interval, ``bank.png`` (DVC plot), MLflow's series."""

    def __init__(self, trainer: MetaTrainer, results: Path, tracker: Tracker):
        self.trainer, self.results, self.tracker = trainer, results, tracker

    def __call__(self) -> None:
        t = self.trainer
        if t.bank is None:
            return
        grid = Image.fromarray(bank_grid(t.bank.images, t.info.mean, t.info.std))
        path = self.results / "bank" / f"iter_{t.iteration:06d}.png"
        write_with(path, lambda tmp: grid.save(tmp, format="PNG"))
        write_with(self.results / "bank.png", lambda tmp: grid.save(tmp, format="PNG"))
        self.tracker.log_image(path, key="bank", step=t.iteration)


def check_divergence(trainer: MetaTrainer) -> None:
    """Stop a run whose updates keep being non-finite, before it writes anything more."""
    if trainer.skipped_in_a_row >= DIVERGED_AFTER:
        raise UserError(f"meta-training diverged at iteration {trainer.iteration}: the last "
                        f"{trainer.skipped_in_a_row} updates had non-finite losses or gradients. Lower "
                        "outer_lr or inversion.lr (or adv_scale), then re-run; the checkpoints written so far "
                        "(finite: non-finite updates are skipped) are kept.")


def _loop(trainer: MetaTrainer, hooks: dict, tracker: Tracker, bar: tqdm, stop: Pending) -> None:
    """Meta-iterations up to the end, calling each hook at its interval (main rank only), until
    ``stop`` records a signal: then the state is saved and :class:`Interrupted` raised."""
    mt, total = trainer.params.metatrain, trainer.params.meta_iterations
    while trainer.iteration < total:
        if stop.signum is not None:
            hooks["checkpoint"]()
            raise Interrupted(stop.signum, f"the state of iteration {trainer.iteration} is saved; run the same "
                              "command again to resume")
        row = trainer.step()
        bar.update(1)
        check_divergence(trainer)
        if not trainer.ranks.is_main:
            continue
        tracker.log_metrics({k: row[k] for k in TRAIN_COLUMNS if k != "iteration"}, step=row["iteration"])
        it = trainer.iteration
        if it % mt.val_interval == 0 or it == total:
            acc = hooks["validate"]()
            bar.set_postfix(loss=f"{row['meta_loss']:.3f}", acc=f"{row['pseudo_accuracy']:.2f}",
                            val=f"{acc:.1f}", best=f"{trainer.best['accuracy']:.1f}")
        if it % mt.image_interval == 0 or it == total:
            hooks["images"]()
        if it % mt.checkpoint_interval == 0 or it == total:
            hooks["checkpoint"]()


def summary(trainer: MetaTrainer, resumed_from: int, started: float) -> dict:
    """The run's record (``details.json``; its headline is ``metrics.json``, :mod:`.headline`)."""
    vals = trainer.val_history["val_accuracy"]
    return {
        "init_val_accuracy": vals[0], "best_val_accuracy": trainer.best["accuracy"],
        "best_iteration": trainer.best["iteration"], "final_val_accuracy": vals[-1],
        "iterations": trainer.iteration, "adversarial_updates": trainer.curriculum.fired,
        "skipped_updates": trainer.skipped, "resumed_from": resumed_from, "oracle": trainer.oracle,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


def _begin(files: RunFiles, fp: str, total: int, fresh: bool, hooks: dict) -> None:
    """Mark the model folder in progress (its models are not for use until the run finishes); a
    fresh run also replaces the previous run's validated models and validates its starting point."""
    if fresh:
        check_replaceable(files.models.history, HISTORY_FOLDER)
    write_json(files.models.in_progress, {"fingerprint": fp, "meta_iterations": total})
    if fresh:
        shutil.rmtree(files.models.history, ignore_errors=True)  # a previous run's checkpoints
        hooks["validate"]()
        hooks["images"]()


def run(params: Params, project: Project, *, files: RunFiles | None = None, oracle: bool = False,
        progress: bool = True, tracker: Tracker | None = None, reuse_complete: bool = False,
        ranks: Ranks = SINGLE) -> dict:
    """Meta-train, checkpointing ``last.pt`` and the best-on-meta-val ``best.safetensors``.

    A ``last.pt`` left by an interrupted run with the same parameters and pool is resumed;
    any other is ignored and overwritten. With ``reuse_complete`` a finished run with the same
    parameters is not repeated (the comparison table uses it). Returns the record written to
    ``details.json`` (an empty dict on the other ranks).
    """
    tracker = tracker or Tracker()
    files = files or RunFiles(project.meta, project.results("metatrain"))
    started = time.perf_counter()
    device = pick_device(params.device)
    with open_lanes(lane_count(params.lanes, device, params.metatrain.compile)) as lanes:
        trainer = build_trainer(params, project, oracle=oracle, device=device, ranks=ranks, lanes=lanes)
        fp = fingerprint(params, project.teachers, oracle)
        return _train(trainer, files, tracker, fp, progress=progress, reuse_complete=reuse_complete, started=started)


def _train(trainer: MetaTrainer, files: RunFiles, tracker: Tracker, fp: str, *, progress: bool,
           reuse_complete: bool, started: float) -> dict:
    """:func:`run` with its trainer built."""
    params, ranks = trainer.params, trainer.ranks
    state = matching_resume_state(files.models.resume_state, fp)
    if state is not None and state["iteration"] >= params.meta_iterations and reuse_complete \
            and (files.results / headline.DETAILS_FILE).is_file():
        return read_json(files.results / headline.DETAILS_FILE)
    resumed_from = 0
    if state is not None and state["iteration"] < params.meta_iterations:
        trainer.load_state_dict(state)
        resumed_from = trainer.iteration
    checkpoints = Checkpoints(trainer, files, fp)
    hooks = {"validate": Validation(trainer, checkpoints, tracker), "checkpoint": checkpoints.save_state,
             "images": BankImages(trainer, files.results, tracker)}
    if ranks.is_main:
        _begin(files, fp, params.meta_iterations, resumed_from == 0, hooks)
    with tqdm(total=params.meta_iterations, initial=resumed_from, desc="metatrain",
              disable=not (progress and ranks.is_main)) as bar, held(enabled=not ranks.active) as stop:
        _loop(trainer, hooks, tracker, bar, stop)
    if not ranks.is_main:
        return {}
    checkpoints.save_state()
    checkpoints.save_last_model()
    files.models.in_progress.unlink()
    metrics = summary(trainer, resumed_from, started)
    headline.write(files.results, metrics, headline.metatrain(metrics))
    return metrics


def log_selected_model(tracker: Tracker, params: Params, project: Project, metrics: dict) -> None:
    """Keep the selected meta-model (linked to ``metrics``) and the teachers' ensemble in the run as
    MLflow models, registered with the aliases ``@champion`` and ``@baseline`` (:mod:`~..serve.registry`)."""
    tracker.log_model(project.meta.best,
                      lambda client, run_id: log_served_models(client, run_id, params, project, metrics))


def main(params: Params, project: Project, *, oracle: bool = False, progress: bool = True) -> dict:
    """The stage as ``purer metatrain`` runs it: :func:`run` in one process, or on every rank under
    ``torchrun``; rank 0 inside its MLflow run, which keeps the selected meta-model and the teachers'
    ensemble as registered MLflow models (:mod:`purer_mlops.serve.registry`). Returns the metrics (an
    empty dict on the other ranks)."""
    ranks = setup()
    try:
        if not ranks.is_main:
            return run(params, project, oracle=oracle, progress=False, tracker=Tracker(), ranks=ranks)
        with open_tracker(params, "metatrain", project.root) as tracker:
            metrics = run(params, project, oracle=oracle, progress=progress, tracker=tracker, ranks=ranks)
            log_selected_model(tracker, params, project, metrics)
            return metrics
    finally:
        teardown(ranks)
