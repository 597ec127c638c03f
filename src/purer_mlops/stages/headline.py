"""The headline numbers of each stage, apart from its full record.

``dvc exp show`` makes a column of every key of every ``metrics:`` file, and a column of every
param: with the per-teacher and per-checkpoint detail in them, no terminal shows a readable
table. So ``results/<stage>/metrics.json`` holds only the few numbers one compares experiments
on, under short keys, rounded to what their intervals resolve; the stage's whole record
(per teacher, the prototype head's paired difference, iteration counts, wall times) goes to
``results/<stage>/details.json`` beside it, an output that is not a metric. The keys below are
the interface of ``dvc exp show``, ``purer summarize`` and ``scripts/check_baseline.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fileio import write_json

METRICS_FILE = "metrics.json"
DETAILS_FILE = "details.json"
# Meta-test accuracy and its 95% interval over the test tasks (percent); ``dvc exp show`` lists
# it first (dvc.yaml's top-level ``metrics:`` order, keys sorted within a file).
TEST_ACC, TEST_CI = "test_acc", "test_ci"
VAL_BEST, VAL_FINAL = "val_best", "val_final"
# Two decimals: the intervals are tenths of a point wide, and a narrow column fits more of them.
DIGITS = 2


def _r(value: Any) -> float:
    return round(float(value), DIGITS)


def pretrain(details: dict) -> dict[str, float]:
    """The pool's mean and worst held-out accuracy (percent) from :func:`..pretrain.pool_metrics`."""
    return {"teacher_mean": _r(details["acc_mean"]), "teacher_worst": _r(details["acc_min"])}


def metatrain(details: dict) -> dict[str, float]:
    """Best (the selected model's) and final meta-val accuracy (percent) of a meta-training run."""
    return {VAL_BEST: _r(details["best_val_accuracy"]), VAL_FINAL: _r(details["final_val_accuracy"])}


def metatest(details: dict) -> dict[str, float]:
    """Meta-test accuracy ± 95% interval of the adaptation head, the prototype head and, when
    measured, ICFIL (percent; the shot is the param ``num_sup_test``)."""
    out = {TEST_ACC: _r(details["accuracy"]), TEST_CI: _r(details["ci95"]),
           "test_proto": _r(details["prototype"]["accuracy"]), "test_proto_ci": _r(details["prototype"]["ci95"])}
    if "icfil" in details:
        out.update({"test_icfil": _r(details["icfil"]["accuracy"]), "test_icfil_ci": _r(details["icfil"]["ci95"])})
    return out


def write(folder: Path, details: dict, headline: dict[str, float]) -> None:
    """Write ``details.json`` (the whole record) and ``metrics.json`` (the headline) in ``folder``."""
    write_json(Path(folder) / DETAILS_FILE, details)
    write_json(Path(folder) / METRICS_FILE, headline)
