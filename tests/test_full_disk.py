"""A full disk, wherever it strikes, is one line, exit 2, and the previous outputs intact.

The disk is filled the way CI can: ``RLIMIT_FSIZE`` in a child process makes every write past
the limit fail with EFBIG, as ENOSPC does on a full filesystem (the same ``OSError`` path):
- the resume state ``last.pt`` (torch's zip writer reported it as a ``RuntimeError`` with a
  40-line trace);
- `purer metatrain` whose checkpoint does not fit: one line, exit 2, no trace;
- an MLflow artifact that does not fit under ``mlruns/``: one line naming it.
Other writers (JSON, CSV, PNG, safetensors, filelists, pools) go through ``fileio`` and are
tested in tests/test_reliability.py.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from conftest import adapt_raw, copy_project, tool_env, write_yaml

PURER = [sys.executable, "-m", "purer_mlops"]

RESUME_STATE = """
import json, resource, sys, torch
from pathlib import Path
from purer_mlops.errors import UserError
from purer_mlops.meta.checkpoint import save_resume_state
target = Path(sys.argv[1])
save_resume_state(target, "fp", {"iteration": 1})
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    save_resume_state(target, "fp", {"iteration": 2, "bank": torch.zeros(100_000)})
except UserError as err:
    print(json.dumps({"error": str(err)}))
    sys.exit(2)
"""


def test_a_resume_state_that_does_not_fit_keeps_the_previous_one(tmp_path: Path) -> None:
    target = tmp_path / "meta" / "last.pt"
    proc = subprocess.run([sys.executable, "-c", RESUME_STATE, str(target)], env=tool_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = json.loads(proc.stdout)["error"]
    assert message.startswith(f"could not write {target}: File too large") and "Free some disk space" in message
    assert torch.load(target, weights_only=True)["iteration"] == 1  # the previous state
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.pt"]  # no temporary left


def _limit(size: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_metatrain_on_a_full_disk_is_one_line(adapt_project: Path, tmp_path: Path) -> None:
    root = copy_project(adapt_project, tmp_path / "project")
    write_yaml(root, adapt_raw(episode_train=20))  # another run: it starts over and saves its state
    # the model files (~0.1 MB) fit, the resume state (model, optimiser, bank) does not
    proc = subprocess.run([*PURER, "metatrain", "--quiet"], cwd=root, env=tool_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=_limit(300_000))
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: could not write") and "last.pt" in line and "Free some disk space" in line
    meta = root / "models" / "meta"
    assert (meta / "in_progress.json").is_file()  # metatest refuses the half run; a re-run starts it again
    assert not [p.name for p in meta.iterdir() if p.name.startswith(".")]  # no temporary left
    assert torch.load(meta / "last.pt", weights_only=True)["iteration"] > 0  # the previous run's, whole


TRACKED_ARTIFACT = """
import json, resource, sys
from pathlib import Path
from purer_mlops.config import from_dict
from purer_mlops.errors import UserError
from purer_mlops.tracking import open_tracker
root, big = Path(sys.argv[1]), Path(sys.argv[2])
try:
    with open_tracker(from_dict({"tracking": True, "experiment_name": "full"}), "metatest", root) as tracker:
        limit = (root / "mlflow.db").stat().st_size + 2**20
        big.write_bytes(b"0" * (limit + 2**20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        tracker.log_artifact(big)
except UserError as err:
    print(json.dumps({"error": str(err)}))
    sys.exit(2)
"""


def test_an_artifact_that_does_not_fit_in_the_store_is_one_line(tmp_path: Path) -> None:
    env = tool_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-c", TRACKED_ARTIFACT, str(tmp_path), str(tmp_path / "big.bin")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = json.loads(proc.stdout)["error"]
    assert message.startswith(f"cannot store {tmp_path / 'big.bin'} to MLflow run") and "File too large" in message
    assert "then re-run the stage" in message and "\n" not in message
