"""The committed baseline: main holds the default run's dvc.lock and results/, and a fresh
clone regenerates the same data (same DVC hashes for `prepare` and `filelist`).

The model stages are bit-identical only on the baseline's machine kind, so CI checks the
data; `scripts/check_baseline.py` checks the rest after a full `dvc repro` (README).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, git, make_dvc_repo, run_dvc, tool_env

SCRIPT = REPO / "scripts" / "check_baseline.py"
BASELINE_FILES = ("dvc.lock", "results/baseline.json", "results/metatest/metrics.json",
                  "results/metatrain/metrics.json", "results/pretrain/metrics.json",
                  "results/metatrain/val.csv", "results/metatrain/train.csv")


def tracked(path: str) -> bool:
    return subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=REPO,
                          capture_output=True).returncode == 0


def test_main_commits_the_default_runs_lock_and_results():
    missing = [p for p in BASELINE_FILES if not tracked(p)]
    assert not missing, f"not committed: {missing} (run dvc repro on the defaults and commit them)"
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    assert {"prepare", "filelist", "pretrain", "metatrain", "metatest"} <= set(lock["stages"])
    machine = json.loads((REPO / "results/baseline.json").read_text())["machine"]
    assert machine["cpu"] and machine["torch"] and machine["threads"] >= 1


@pytest.fixture(scope="module")
def data_clone(tmp_path_factory):
    """A clone with the defaults and main's dvc.lock, after `dvc repro filelist`."""
    root = make_dvc_repo(tmp_path_factory.mktemp("baseline") / "repo")
    shutil.copy2(REPO / "dvc.lock", root / "dvc.lock")
    git(root, "add", "dvc.lock")
    git(root, "commit", "-q", "-m", "baseline lock")
    run_dvc(root, "repro", "filelist", check=True, timeout=1200)
    return root


def check(root) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT)], cwd=root, env=tool_env(),
                          capture_output=True, text=True, timeout=120)


def test_a_fresh_clone_regenerates_the_committed_data(data_clone):
    assert git(data_clone, "diff", "--stat", "dvc.lock").stdout == ""
    assert "up to date" in run_dvc(data_clone, "status", "prepare", "filelist", check=True).stdout
    proc = check(data_clone)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prepare: same data hashes" in proc.stdout and "filelist: same data hashes" in proc.stdout


def test_the_check_names_the_stage_whose_data_differ(data_clone):
    lock_path = data_clone / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text())
    out = lock["stages"]["prepare"]["outs"][0]
    original = lock_path.read_text()
    try:
        lock_path.write_text(original.replace(out["md5"], "0" * 32 + ".dir"))
        proc = check(data_clone)
    finally:
        lock_path.write_text(original)
    assert proc.returncode == 1
    assert "prepare: FAIL" in proc.stdout and out["path"] in proc.stderr
