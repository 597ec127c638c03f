"""Experiment tracking: every stage run that opens a tracker becomes one MLflow run.

:class:`Tracker` is the no-op tracker (``tracking: false``); :class:`MlflowTracker` implements
the same methods. Stages only ever call these methods, through :func:`open_tracker`.

The store is ``sqlite:///<root>/mlflow.db`` with artifacts under ``<root>/mlruns``, ``root``
being ``DVC_ROOT`` when DVC sets it (queued and ``--temp`` experiments run in a temporary copy
that is deleted afterwards) and the project root otherwise; an explicit ``MLFLOW_TRACKING_URI``
wins. Runs are tagged with the DVC experiment, the git commit and the PURER scenario, and the
runs of stages that read the meta-model (``metatest``, ``compare``) are nested under the
meta-training run that produced it. See docs/tracking.md.

Modules: :mod:`.store` (where the store is, opening it), :mod:`.tracker` (the two trackers),
:mod:`.runs` (a stage's run: name, tags, params, parent), :mod:`.outputs` (what a finished
stage leaves that its run keeps).
"""

from .runs import open_tracker, run_name, scenario
from .store import TrackingError, store_root, tracking_uri
from .tracker import MlflowTracker, Tracker

__all__ = ["MlflowTracker", "Tracker", "TrackingError", "open_tracker", "run_name", "scenario", "store_root",
           "tracking_uri"]
