"""Stage ``metatest``: the selected meta-model on ``episode_test`` fixed, seeded real tasks.

Reports the mean accuracy with its 95% interval (1.96·std/√n), the per-task accuracies (for
paired comparisons between methods that share the tasks), the second head beside the
test-time adaptation (nearest prototype on the meta-model's embedding, :mod:`..meta.heads`; so
one sees whether a weakness is in the features or in the adaptation), optionally the same tasks
with ICFIL and the paired gain, and, clearly labelled, the reference code's optimistic
protocol: the best *test* accuracy over all validated checkpoints. What the model is (backbone,
meta-learner, image size, normalisation) comes from its model card, never from ``params.yaml``.
"""

from __future__ import annotations

import time

import torch

from ..config import Params
from ..data.dataset import ImageSet, TaskIndices
from ..distributed import pick_device
from ..fileio import write_csv
from ..meta.checkpoint import load_model
from ..meta.heads import FORM, prototype_accuracies
from ..meta.scoring import fixed_test_tasks, paired, score, summary
from ..paths import Project
from ..tracking import Tracker, open_tracker
from . import headline


def reference_protocol(params: Params, project: Project, test: ImageSet, tasks: list[TaskIndices],
                       device: torch.device) -> dict | None:
    """The reference's number: best meta-TEST accuracy over every validated checkpoint (optimistic)."""
    history = sorted(project.meta.history.glob("iter_*.safetensors"))
    if not params.metatest.reference_protocol or not history:
        return None
    accuracies = []
    for path in history:
        model, card = load_model(path.with_suffix(""), device)
        accuracies.append(summary(score(params, model, test, tasks, meta_learner=card["meta_learner"]))["accuracy"])
    return {"accuracy": max(accuracies), "checkpoints": len(history),
            "note": "best meta-TEST accuracy over checkpoints (the reference code's protocol; "
                    "optimistic, for comparison with the paper only)"}


def run(params: Params, project: Project, *, progress: bool = True, tracker: Tracker | None = None) -> dict:
    """Meta-test ``models/meta/best`` and write ``results/metatest/``: ``metrics.json`` (the
    headline, :mod:`.headline`), ``details.json`` (the returned record) and ``per_task.csv``."""
    tracker = tracker or Tracker()
    started = time.perf_counter()
    device = pick_device(params.device)
    out = project.results("metatest")
    model, card = load_model(project.meta.best, device)
    test, tasks = fixed_test_tasks(params, project)
    accs = score(params, model, test, tasks, meta_learner=card["meta_learner"], progress=progress)
    metrics: dict = {**summary(accs), "way": params.way_test, "shot": params.num_sup_test,
                     "checkpoint_iteration": card["iteration"], "val_accuracy": card["val_accuracy"]}
    columns = {"task": list(range(len(tasks))), "accuracy": accs.tolist()}
    if params.icfil:
        with_icfil = score(params, model, test, tasks, meta_learner=card["meta_learner"], icfil=True,
                           progress=progress)
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
    headline.write(out, metrics, headline.metatest(metrics))
    tracker.log_metrics({"test_accuracy": metrics["accuracy"], "test_ci95": metrics["ci95"],
                         "test_prototype_accuracy": metrics["prototype"]["accuracy"],
                         "test_prototype_ci95": metrics["prototype"]["ci95"]})
    tracker.log_artifact(out / headline.METRICS_FILE)
    tracker.log_artifact(out / headline.DETAILS_FILE)
    return metrics


def main(params: Params, project: Project, progress: bool = True) -> dict:
    """The stage as ``purer metatest`` runs it: :func:`run` inside its MLflow run."""
    with open_tracker(params, "metatest", project.root) as tracker:
        return run(params, project, progress=progress, tracker=tracker)
