"""Comparing experiments: `dvc exp show` readable in an 80-column terminal, and settings compared
over seeds with a queued grid and `purer summarize`.

One fresh clone with tiny params serves the module: `dvc repro` (committed), `dvc exp run -n
adv-half -S adv_scale=0.5`; the sweep test then queues 2 settings × 2 seeds. The numbers the
summary prints are checked against ones computed here from the experiments' own metrics.
"""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
from conftest import (
    BIN,
    CLONE_TINY,
    check_one_error_line,
    git,
    make_dvc_repo,
    reproduced_repo,
    run_dvc,
    run_purer,
    tool_env,
)
from scipy import stats

pytestmark = pytest.mark.slow
HEADLINE = {"test_acc", "test_ci", "test_proto", "test_proto_ci", "val_best", "val_final", "teacher_mean",
            "teacher_worst"}
ROW_COLUMNS = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The clone after `dvc repro` (committed) and the experiment `adv-half` (adv_scale 0.5)."""
    root = reproduced_repo(tmp_path_factory.mktemp("sweeps") / "repo", CLONE_TINY)
    run_dvc(root, "exp", "run", "-n", "adv-half", "-S", "adv_scale=0.5", check=True)
    return root


def shown_runs(root: Path) -> list[dict]:
    """(name, params, metrics) of every baseline and experiment of `dvc exp show --json`."""
    out = []
    for baseline in json.loads(run_dvc(root, "exp", "show", "--json", check=True).stdout):
        entries = [] if baseline["rev"] == "workspace" else [baseline]
        entries += [r for g in baseline.get("experiments") or [] for r in g["revs"]]
        for e in entries:
            data = e["data"]
            metrics = {k: v for m in (data.get("metrics") or {}).values() for k, v in m["data"].items()}
            out.append({"name": e.get("name"), "params": data["params"]["params.yaml"]["data"], "metrics": metrics})
    return out


def in_terminal(cmd: list[str], cwd: Path, cols: int = 80, rows: int = 40, timeout: float = 120) -> list[str]:
    """The lines a user sees running ``cmd`` in a ``cols``-column terminal: a pseudo-terminal of
    that size, the default pager (`less`, which DVC calls with --chop-long-lines) quit at its end."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {k: v for k, v in tool_env({"TERM": "xterm"}).items()
           if k not in ("COLUMNS", "LINES", "PAGER", "DVC_PAGER", "LESS")}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            preexec_fn=lambda: (os.setsid(), fcntl.ioctl(0, termios.TIOCSCTTY, 0)))
    os.close(slave)
    screen, quit_sent, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # the terminal closed: the command ended
                    break
                screen += chunk
                if b"(END)" in screen and not quit_sent:
                    os.write(master, b"q")  # quit the pager, as the user would
                    quit_sent = True
            elif proc.poll() is not None:
                break
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]", "", screen.decode(errors="replace"))
    return [line.rstrip(">") for line in text.replace("\r", "").split("\n")]


@pytest.mark.skipif(shutil.which("less") is None, reason="DVC pages through less in a terminal")
def test_exp_show_in_an_80_column_terminal_shows_the_names_and_the_meta_test_accuracy(repo):
    lines = in_terminal([str(BIN / "dvc"), "exp", "show"], repo)
    assert all(len(line) <= 80 for line in lines), lines
    header = next(line for line in lines if "Experiment" in line)
    assert "test_acc" in header, "\n".join(lines)
    end = header.index("test_acc") + len("test_acc")  # metric columns are right-aligned
    branch = git(repo, "branch", "--show-current").stdout.strip()
    runs = {r["name"]: r["metrics"]["test_acc"] for r in shown_runs(repo)}
    for name in (branch, "adv-half"):
        (row,) = [line for line in lines if re.search(rf"(^|\[| ){re.escape(name)}(\]| )", line)]
        value = f"{runs[name]:.5g}"  # DVC's format: 5 significant digits
        assert row[end - len(value):end] == value, (name, value, "\n".join(lines))


def test_only_changed_shows_the_swept_param_and_the_changed_metrics_only(repo):
    rows = list(csv.DictReader(run_dvc(repo, "exp", "show", "--only-changed", "--csv", check=True)
                               .stdout.splitlines()))
    columns = set(rows[0]) - ROW_COLUMNS
    # the swept param and the metrics whose values differ (pretraining did not re-run: not the
    # teachers'), nothing that changes by itself (no wall time, no param, no dependency)
    full = list(csv.DictReader(run_dvc(repo, "exp", "show", "--csv", check=True).stdout.splitlines()))
    values = {k: {r[k] for r in full} for k in HEADLINE}
    changed = {k for k in ("test_acc", "test_ci", "test_proto", "test_proto_ci", "val_best", "val_final")
               if len(values[k]) > 1}
    assert columns == {"adv_scale"} | changed, columns
    assert {r["adv_scale"] for r in rows} == {"10.0", "0.5"}
    # DVC cuts the right-most columns (the params) to fit: the full set needs ~125 columns, and
    # docs/tracking.md's narrower view fits 80
    table = run_dvc(repo, "exp", "show", "--only-changed", "--no-pager", env={"COLUMNS": "200"}, check=True).stdout
    assert "adv_scale" in table and "adv-half" in table, table
    narrow = run_dvc(repo, "exp", "show", "--only-changed", "--drop", "Created|.*_ci|test_proto|val_final",
                     "--no-pager", env={"COLUMNS": "80"}, check=True).stdout
    header = next(line for line in narrow.splitlines() if "Experiment" in line)
    assert header.split() == ["Experiment", *(k for k in ("test_acc", "val_best") if k in changed), "adv_scale"], narrow


def wait_for_queue(root: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while re.search(r"\b(Queued|Running)\b", run_dvc(root, "queue", "status", check=True).stdout):
        assert time.monotonic() < deadline, run_dvc(root, "queue", "status").stdout
        time.sleep(5)


def by_hand(runs: list[dict], metric: str) -> dict[float, dict[int, float]]:
    """``{adv_scale: {seed: value}}``; a setting and seed run twice must give the same numbers."""
    out: dict[float, dict[int, float]] = {}
    for r in runs:
        if metric in r["metrics"]:
            seen = out.setdefault(float(r["params"]["adv_scale"]), {})
            value = r["metrics"][metric]
            assert seen.setdefault(r["params"]["seed"], value) == value, r  # deterministic on one machine
    return out


def t_half(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def test_a_queued_grid_over_seeds_is_summarised_per_setting_and_paired_by_seed(repo, tmp_path):
    run_dvc(repo, "exp", "run", "--queue", "-S", "adv_scale=0.5,10", "-S", "seed=range(0,2)", check=True)
    try:
        run_dvc(repo, "queue", "start", check=True)
        wait_for_queue(repo)
    finally:
        run_dvc(repo, "queue", "stop", "--kill")
    failed = run_dvc(repo, "queue", "status").stdout
    assert "Failed" not in failed, failed

    out = run_purer(repo, "summarize", "--reference", "adv_scale=10", "--csv", str(tmp_path / "s.csv"),
                    "--markdown", str(tmp_path / "s.md"), "--plot", str(tmp_path / "s.png"))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["setting"]: r for r in csv.DictReader((tmp_path / "s.csv").open())}
    assert set(rows) == {"adv_scale=0.5", "adv_scale=10"}, rows

    runs = shown_runs(repo)
    test, val = by_hand(runs, "test_acc"), by_hand(runs, "val_best")
    for adv in (0.5, 10.0):
        row = rows[f"adv_scale={adv:g}"]
        assert int(row["n"]) == 2 and row["seeds"] == "0 1"
        assert float(row["test_mean"]) == pytest.approx(sum(test[adv].values()) / 2, abs=1e-9)
        assert float(row["val_mean"]) == pytest.approx(sum(val[adv].values()) / 2, abs=1e-9)
        if len(set(test[adv].values())) > 1:
            assert float(row["test_ci"]) == pytest.approx(t_half(list(test[adv].values())), rel=1e-6)
    diffs = [test[0.5][s] - test[10.0][s] for s in (0, 1)]
    half = rows["adv_scale=0.5"]
    assert half["reference"] == "False" and rows["adv_scale=10"]["reference"] == "True"
    assert float(half["d_test"]) == pytest.approx(sum(diffs) / 2, abs=1e-9)
    if diffs[0] != diffs[1]:
        assert float(half["d_test_ci"]) == pytest.approx(t_half(diffs), rel=1e-6)
        expected_p = stats.ttest_rel([test[0.5][s] for s in (0, 1)], [test[10.0][s] for s in (0, 1)]).pvalue
        assert float(half["d_test_p"]) == pytest.approx(expected_p, rel=1e-6)
    assert f"{sum(diffs) / 2:+.2f}" in out.stdout and "reference" in out.stdout  # the printed table
    assert (tmp_path / "s.md").read_text().startswith("| setting | n | seeds |")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_mlflow(repo, out.stderr)


def check_mlflow(root: Path, stderr: str) -> None:
    """The summary is a run of the project's experiment; every meta-training run carries its seed."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("purer")
    (summary,) = client.search_runs([experiment.experiment_id], "tags.`purer.stage` = 'summarize'")
    assert summary.info.run_id in stderr and summary.info.status == "FINISHED"
    files = {f.path for f in client.list_artifacts(summary.info.run_id)}
    assert {"summary.md", "summary.csv", "summary.png", "summary_table.json"} <= files, files
    trained = client.search_runs([experiment.experiment_id], "tags.`purer.stage` = 'metatrain'")
    assert {r.data.tags["seed"] for r in trained} == {"0", "1"}
    assert all(r.data.tags["seed"] == r.data.params["seed"] for r in trained)


def test_an_unknown_reference_is_one_line_naming_the_settings(repo):
    proc = run_purer(repo, "summarize", "--no-mlflow", "--reference", "adv_scale=3")
    check_one_error_line(proc, "adv_scale=3", "matches no setting", "adv_scale=0.5")
    proc = run_purer(repo, "summarize", "--no-mlflow", "--reference", "seed=0")
    check_one_error_line(proc, "seed", "not a param")


def test_experiments_without_a_meta_val_or_meta_test_accuracy_are_refused(tmp_path):
    root = make_dvc_repo(tmp_path / "repo", CLONE_TINY)  # never reproduced: no metrics
    proc = run_purer(root, "summarize")
    check_one_error_line(proc, "no experiment has a meta-val or meta-test accuracy", "dvc exp run")
