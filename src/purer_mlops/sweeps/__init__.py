"""Settings compared over seeds: ``purer summarize`` (docs/tracking.md, "Comparing settings over seeds").

:mod:`.experiments` reads the runs of ``dvc exp show --json`` or of run folders, :mod:`.summary` groups them by every
param but the seed and computes intervals and paired differences, :mod:`.report` writes the text,
Markdown, CSV and plot, :mod:`.mlflow_run` logs the summary as an MLflow run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..fileio import write_text
from .experiments import dvc_runs, exp_show, folder_runs
from .mlflow_run import log_summary
from .report import csv_text, markdown, plot, text_table, write_files
from .summary import summarize


def summarize_experiments(root: Path, reference: str | None = None, *, folders: list[Path] | None = None,
                          markdown_path: Path | None = None, csv_path: Path | None = None,
                          plot_path: Path | None = None, experiment: str | None = None) -> tuple[str, str | None]:
    """Summarise over seeds the run ``folders`` or, without them, the experiments of the DVC
    repository ``root``; write the requested files and, with an ``experiment`` name, log the
    summary to MLflow (the store of ``root``). Returns the text table and the MLflow run's id
    (None when not logged)."""
    runs = folder_runs(folders) if folders else dvc_runs(exp_show(root))
    rows = summarize(runs, reference)
    if markdown_path:
        write_text(markdown_path, markdown(rows))
    if csv_path:
        write_text(csv_path, csv_text(rows))
    if plot_path:
        plot(runs, rows, plot_path)
    run_id = None
    if experiment:
        with tempfile.TemporaryDirectory() as tmp:
            run_id = log_summary(root, experiment, rows, write_files(runs, rows, Path(tmp)), reference)
    return text_table(rows), run_id


__all__ = ["summarize_experiments"]
