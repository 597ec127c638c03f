"""Stage ``metatest``: the selected meta-model on ``episode_test`` fixed, seeded real tasks.

Reports the mean accuracy with its 95% interval (1.96·std/√n), the per-task accuracies (for
paired comparisons between methods that share the tasks), the second head beside the
test-time adaptation (nearest prototype on the meta-model's embedding, :mod:`.heads`; so one
sees whether a weakness is in the features or in the adaptation), optionally the same tasks
with ICFIL and the paired gain, and, clearly labelled, the reference code's optimistic
protocol: the best *test* accuracy over all validated checkpoints.
"""

from __future__ import annotations

import time

import torch

from ..compiling import check_compiler
from ..config import Params
from ..data.dataset import ImageSet, TaskIndices, fixed_tasks, load_split
from ..distributed import pick_device
from ..fileio import write_csv, write_json
from ..lanes import lane_count, open_lanes
from ..paths import Project
from ..tracking import Tracker
from .checkpoint import load_model
from .evaluation import mean_ci95, task_accuracies
from .heads import FORM, prototype_accuracies
from .icfil import ICFIL
from .learners import build_learner


def fixed_test_tasks(params: Params, project: Project, shot: int | None = None
                     ) -> tuple[ImageSet, list[TaskIndices]]:
    """meta_test and its fixed tasks: same seed → same images for every method."""
    test = load_split(params.dataset, project.dataset(params.dataset), "meta_test")
    shot = shot or params.num_sup_test
    test.check_task_shape(params.way_test, shot, params.num_qur_test,
                          ("way_test", "num_sup_test", "num_qur_test"))
    return test, fixed_tasks(test, params.episode_test, params.way_test, shot, params.num_qur_test,
                             seed=params.metatest.seed)


def score(params: Params, model: torch.nn.Module, test: ImageSet, tasks: list[TaskIndices], *,
          icfil: bool = False, progress: bool = False) -> torch.Tensor:
    """Per-task accuracies (in [0, 1]) of ``model`` adapted with the test-time settings, the
    tasks shared among the ``lanes`` (ICFIL: one lane)."""
    device = next(model.parameters()).device
    if params.metatest.compile:
        check_compiler(device, "metatest.compile")
    learner = build_learner(params.meta_learner, model, params.test_inner_update_num, params.inner_lr, fast=True,
                            compiled=params.metatest.compile)
    predict = ICFIL(learner, params.calibration, params.inversion, params.metatest.seed).batch if icfil else None
    with open_lanes(lane_count(params.lanes, device, params.metatest.compile or icfil)) as lanes:
        return task_accuracies(learner, dict(model.named_parameters()), test, tasks, progress=progress,
                               predict=predict, lanes=lanes)


def paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean and 95% interval (percent) of the per-task difference a − b on shared tasks."""
    mean, ci = mean_ci95(100.0 * (a - b))
    return {"difference": mean, "ci95": ci}


def summary(accs: torch.Tensor) -> dict[str, float]:
    """Mean accuracy and its 95% interval (percent) over tasks, and the task count."""
    mean, ci = mean_ci95(100.0 * accs)
    return {"accuracy": mean, "ci95": ci, "episodes": int(accs.numel())}


def reference_protocol(params: Params, project: Project, test: ImageSet, tasks: list[TaskIndices],
                       device: torch.device) -> dict | None:
    """The reference's number: best meta-TEST accuracy over every validated checkpoint (optimistic)."""
    history = sorted(project.meta.history.glob("iter_*.safetensors"))
    if not params.metatest.reference_protocol or not history:
        return None
    best_test = max(summary(score(params, load_model(p.with_suffix(""), device)[0], test, tasks))["accuracy"]
                    for p in history)
    return {"accuracy": best_test, "checkpoints": len(history),
            "note": "best meta-TEST accuracy over checkpoints (the reference code's protocol; "
                    "optimistic, for comparison with the paper only)"}


def run(params: Params, project: Project, *, progress: bool = True, tracker: Tracker | None = None) -> dict:
    """Meta-test ``models/meta/best`` and write ``results/metatest/``."""
    tracker = tracker or Tracker()
    started = time.perf_counter()
    device = pick_device(params.device)
    out = project.results("metatest")
    model, card = load_model(project.meta.best, device)
    test, tasks = fixed_test_tasks(params, project)
    accs = score(params, model, test, tasks, progress=progress)
    metrics: dict = {**summary(accs), "way": params.way_test, "shot": params.num_sup_test,
                     "checkpoint_iteration": card["iteration"], "val_accuracy": card["val_accuracy"]}
    columns = {"task": list(range(len(tasks))), "accuracy": accs.tolist()}
    if params.icfil:
        with_icfil = score(params, model, test, tasks, icfil=True, progress=progress)
        metrics["icfil"] = {**summary(with_icfil), "gain": paired(with_icfil, accs)}
        columns["accuracy_icfil"] = with_icfil.tolist()
    reference = reference_protocol(params, project, test, tasks, device)
    if reference:
        metrics["reference_protocol"] = reference
    proto = prototype_accuracies(model, test, tasks)  # after the adaptation head, which it leaves as it was
    metrics["prototype"] = {**summary(proto), "form": FORM, "vs_adaptation": paired(proto, accs)}
    columns["accuracy_prototype"] = proto.tolist()
    metrics["wall_seconds"] = round(time.perf_counter() - started, 2)
    write_csv(out / "per_task.csv", columns)
    write_json(out / "metrics.json", metrics)
    tracker.log_metrics({"test_accuracy": metrics["accuracy"], "test_ci95": metrics["ci95"],
                         "test_prototype_accuracy": metrics["prototype"]["accuracy"],
                         "test_prototype_ci95": metrics["prototype"]["ci95"]})
    tracker.log_artifact(out / "metrics.json")
    return metrics
