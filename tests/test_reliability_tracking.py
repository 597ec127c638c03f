"""Reliability of tracking: a store or server that cannot be used stops the stage at once, with
one line that names it and the fix (docs/reliability.md lists each case).

Every case runs the real ``purer metatest`` in a project without a meta-model: the stage opens
its MLflow run first, so a tracking problem is reported before anything else, and a working
store shows as the next error ("meta-model ... not found"). The stores are real SQLite files;
the failing server is a real HTTP server whose API answers 500.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import check_one_error_line, new_project, tool_env

PURER = [sys.executable, "-m", "purer_mlops"]
NO_MODEL = "meta-model"  # the error of a stage whose tracking worked: the model is missing


def metatest(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``purer metatest`` in ``root`` with tracking on; ``env`` adds variables (MLFLOW_TRACKING_URI)."""
    variables = tool_env(env)
    if "MLFLOW_TRACKING_URI" not in env:
        variables.pop("MLFLOW_TRACKING_URI", None)
    for name in ("DVC_ROOT", "DVC_EXP_NAME"):
        variables.pop(name, None)
    return subprocess.run([*PURER, "metatest", "--quiet"], cwd=root, env=variables, capture_output=True,
                          text=True, timeout=180)


def make_store(root: Path) -> None:
    """A first stage run in ``root``: it creates mlflow.db, the experiment and mlruns/, then stops."""
    proc = metatest(root)
    assert proc.returncode == 2 and NO_MODEL in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
    assert (root / "mlflow.db").is_file() and (root / "mlruns").is_dir()


def test_a_moved_project_does_not_write_to_its_old_path(tmp_path: Path) -> None:
    old = new_project(tmp_path / "A")
    make_store(old)
    new = old.rename(tmp_path / "B")
    check_one_error_line(metatest(new), f"keeps its artifacts in {old / 'mlruns'}", str(new / "mlruns"), "moved")
    assert not old.exists()  # not recreated
    proc = metatest(new, MLFLOW_TRACKING_URI=f"sqlite:///{new / 'mlflow.db'}")  # the same store, named
    check_one_error_line(proc, f"keeps its artifacts in {old / 'mlruns'}")
    assert not old.exists()


def test_a_copied_project_gets_its_own_artifacts_with_a_new_experiment(tmp_path: Path) -> None:
    original = new_project(tmp_path / "A")
    make_store(original)
    runs = sorted(p.name for p in (original / "mlruns").iterdir())
    copy = Path(shutil.copytree(original, tmp_path / "B"))
    check_one_error_line(metatest(copy), f"keeps its artifacts in {original / 'mlruns'}", "experiment_name")
    text = (copy / "params.yaml").read_text().replace("experiment_name: purer", "experiment_name: purer-b")
    (copy / "params.yaml").write_text(text)
    check_one_error_line(metatest(copy), NO_MODEL)  # the fix the message names works
    assert sorted(p.name for p in (original / "mlruns").iterdir()) == runs  # nothing went to the original
    assert len(list((copy / "mlruns").iterdir())) > len(runs)  # the new experiment's run is in the copy


def test_a_tracking_uri_without_a_scheme_is_named(tmp_path: Path) -> None:
    check_one_error_line(metatest(new_project(tmp_path / "p"), MLFLOW_TRACKING_URI="127.0.0.1:5000"),
                   "'127.0.0.1:5000'", "add http://")


class HealthyButBroken(BaseHTTPRequestHandler):
    """A tracking server whose health check answers and whose API fails (a broken backend store)."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self._answer(200 if self.path == "/health" else 500)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(500)

    def _answer(self, code: int) -> None:
        body = b"OK" if code == 200 else b'{"error_code": "INTERNAL_ERROR"}'
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def broken_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), HealthyButBroken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_server_whose_api_fails_is_named_at_once(tmp_path: Path, broken_server: str) -> None:
    # MLflow's own client retries a 500 for about four minutes; the subprocess timeout is less.
    proc = metatest(new_project(tmp_path / "p"), MLFLOW_TRACKING_URI=broken_server)
    check_one_error_line(proc, f"the MLflow server at {broken_server} does not work", "500")


def _unwritable(path: Path) -> None:
    """No process may write ``path``: read-only for users, immutable for root (who ignores modes)."""
    if os.geteuid() != 0:
        path.chmod(0o444)
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root, and chattr +i is not available here")


def test_an_unwritable_store_is_one_line(tmp_path: Path) -> None:
    root = new_project(tmp_path / "p")
    make_store(root)
    _unwritable(root / "mlflow.db")
    try:
        proc = metatest(root)
    finally:
        subprocess.run(["chattr", "-i", str(root / "mlflow.db")], capture_output=True)
    check_one_error_line(proc, f"cannot log to the MLflow store sqlite:///{root / 'mlflow.db'}",
                   "attempt to write a readonly database")
