"""Benchmark of the meta-training curve's logging: one MLflow write per iteration against the
buffered tracker (one write per ``FLUSH_SECONDS``), in the same run, on a real SQLite store:

    pytest tests/benchmarks/test_tracking_metrics.py -o addopts="" --benchmark-only

Each round logs the eight columns of 100 meta-iterations; the per-iteration cost is the
round's time / 100 (a default meta-iteration takes about 200 ms on a 2-core CPU).
"""

from __future__ import annotations

import pytest

from purer_mlops.tracking.tracker import MlflowTracker

ITERATIONS = 100
COLUMNS = ("meta_loss", "pseudo_accuracy", "inversion_loss", "ce", "bn", "tv", "l2", "adversarial")


@pytest.mark.parametrize("mode", ["per_iteration", "buffered"])
def test_curve_logging(benchmark, tmp_path, monkeypatch, mode: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("bench", artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = client.create_run(experiment).info.run_id
    # FLUSH_SECONDS 0 writes at every call: the tracker as it was before buffering
    monkeypatch.setattr(MlflowTracker, "FLUSH_SECONDS", 0.0 if mode == "per_iteration" else 3600.0)
    tracker = MlflowTracker(client, run_id, tmp_path)
    steps = iter(range(10**9))

    def log_curve() -> None:
        for _ in range(ITERATIONS):
            step = next(steps)
            tracker.log_metrics({c: float(step) for c in COLUMNS}, step=step)
        tracker.flush()

    benchmark.group = "tracking_metrics"
    benchmark.name = f"tracking_metrics_{mode}"
    benchmark.pedantic(log_curve, rounds=5, iterations=1, warmup_rounds=1)
    assert len(client.get_metric_history(run_id, "meta_loss")) == ITERATIONS * 6
