"""Reliability of what commands write, and of runs that are stopped: the real CLI on a tiny project.

- **Output folders.** No command deletes or replaces a folder it did not write, unless the
  folder holds nothing but that command's outputs, and never a folder that contains one of its
  inputs (``OUTPUT_FOLDER_CASES``: each refusal names the folder, and every file stays).
- **Stopped runs.** ``kill -9`` leaves temporaries that the next write removes; a new
  meta-training run killed early leaves models that ``purer metatest`` refuses; model files
  get the usual mode; a card edited to another backbone is named.

docs/reliability.md lists every case with its test. Each test copies a module-scoped project
(tiny Glyph-FS, two untrained conv4 teachers, one finished six-iteration meta-training run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import (
    check_one_error_line,
    lay_out_task,
    random_pool,
    small_glyphs,
    tiny_params,
    tiny_raw,
    tool_env,
    write_params,
    write_yaml,
)

from purer_mlops.meta.scoring import fixed_test_tasks
from purer_mlops.models.backbones import build_backbone
from purer_mlops.paths import Project

ENV = tool_env({"MKL_NUM_THREADS": "1"})
PURER = [sys.executable, "-m", "purer_mlops"]


def purer(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real CLI in ``root`` under umask 022, the usual one."""
    return subprocess.run([*PURER, *args], cwd=root, env=ENV, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=lambda: os.umask(0o022))


def start(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*PURER, *args], cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: os.umask(0o022))


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll until ``condition()`` holds while ``proc`` runs (the test fails if it ends first)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` now (from /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(status.parent.name))
    return found


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (zombies of a reaped-later child count as ended)."""
    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    return [pid for pid in pids if running(pid)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_glyphs: Path) -> Path:
    """Tiny Glyph-FS, two untrained conv4 teachers, a finished meta-training run. Copy before use."""
    root = tmp_path_factory.mktemp("runs") / "project"
    small_glyphs(tiny_glyphs, root)
    random_pool(root / "models" / "teachers", [("conv4", 32, (0, 1, 2, 3, 4)), ("conv4", 32, (5, 6, 7, 8, 9))])
    write_yaml(root, tiny_raw(**{"glyphs.images_per_class": 20}))
    proc = purer(root, "metatrain", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture
def project(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "p"))


# =========================================================================== output folders


def snapshot(paths: list[Path]) -> dict[str, bytes | None]:
    """Every file under ``paths`` with its bytes (a folder: its files; a missing path: None)."""
    out: dict[str, bytes | None] = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out.update({str(f): f.read_bytes() if f.exists() else None for f in files})
    return out


def checkpoints(root: Path, folder: str = "incoming") -> tuple[Path, Path]:
    """``root/<folder>/t.pt`` (a conv4 state dict of 5 meta_train classes) and the manifest ``root/m.json``."""
    source = root / folder
    source.mkdir(parents=True)
    torch.save(build_backbone("conv4", 5, 32).state_dict(), source / "t.pt")
    classes = sorted(p.name for p in (root / "data" / "glyphs" / "meta_train").iterdir())[:5]
    (root / "m.json").write_text(json.dumps({"teachers": [
        {"file": "t.pt", "arch": "conv4", "dataset": "glyphs", "classes": classes}]}))
    return source, root / "m.json"


def _import_into(out: str, source: str = "incoming") -> Callable[[Path], tuple[list[str], list[Path]]]:
    def setup(root: Path) -> tuple[list[str], list[Path]]:
        src, manifest = checkpoints(root, source)
        return (["teachers", "import", str(src), "--manifest", str(manifest), "--out", out],
                [root / "models", src, manifest])
    return setup


def _user_file_in(folder: str, command: list[str]) -> Callable[[Path], tuple[list[str], list[Path]]]:
    def setup(root: Path) -> tuple[list[str], list[Path]]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "notes.txt").write_text("mine")
        return command, [root / folder]
    return setup


# (id, setup returning (command, the paths that must stay byte for byte), words of the refusal)
OUTPUT_FOLDER_CASES = [
    ("import-into-the-models-folder", _import_into("models"), ["models is not a teacher pool", "meta"]),
    ("import-into-its-source-folder", _import_into("incoming"), ["contains the input", "incoming"]),
    ("import-into-a-folder-holding-its-source", _import_into("inbox", source="inbox/reference"),
     ["contains the input", "inbox/reference"]),
    ("prepare-over-a-user-file", _user_file_in("data/glyphs", ["prepare", "--quiet"]),
     ["data/glyphs is not a dataset folder", "notes.txt"]),
    ("filelist-over-a-user-file", _user_file_in("data/glyphs/split", ["filelist", "--quiet"]),
     ["data/glyphs/split is not a filelist folder", "notes.txt"]),
    ("pretrain-over-a-user-file", _user_file_in("models/teachers", ["pretrain", "--quiet"]),
     ["models/teachers is not a teacher pool", "notes.txt"]),
    ("metatrain-over-a-user-file", _user_file_in("models/meta/history", ["metatrain", "--quiet"]),
     ["models/meta/history is not a folder of validated models", "notes.txt"]),
]


@pytest.mark.parametrize(("setup", "words"), [c[1:] for c in OUTPUT_FOLDER_CASES],
                         ids=[c[0] for c in OUTPUT_FOLDER_CASES])
def test_a_folder_the_command_did_not_write_is_refused(project: Path, setup, words: list[str]) -> None:
    command, kept = setup(project)
    before = snapshot(kept)
    check_one_error_line(purer(project, *command), *words)
    assert snapshot(kept) == before


def test_import_into_a_pool_or_a_new_folder_works(project: Path) -> None:
    source, manifest = checkpoints(project)
    for out in ("models/teachers", "elsewhere/pool"):
        proc = purer(project, "teachers", "import", str(source), "--manifest", str(manifest), "--out", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(json.loads((project / out / "pool.json").read_text())["teachers"]) == 1
    assert (project / "models" / "meta" / "best.safetensors").is_file()


# =========================================================================== stopped runs


def test_kill_9_during_prepare_then_the_next_run_removes_the_temporary(project: Path) -> None:
    shutil.rmtree(project / "data" / "glyphs")
    write_params(project, {"glyphs.images_per_class": 400})  # long enough to be killed midway
    proc = start(project, "prepare", "--quiet")
    data = project / "data"

    def writing() -> bool:
        return any(p.name.startswith(".glyphs.") and any(p.rglob("*.png")) for p in data.iterdir())

    wait_for(writing, proc)
    workers = children(proc.pid)
    assert workers  # prepare renders with one process per CPU (two or more here)
    proc.kill()
    proc.wait()
    assert [p for p in data.iterdir() if p.name.startswith(".glyphs.")]  # left behind by kill -9
    deadline = time.monotonic() + 10
    while alive(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(workers), f"workers outlived their parent: {alive(workers)}"
    write_params(project, {"glyphs.images_per_class": 2})
    done = purer(project, "prepare", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in data.iterdir()) == ["glyphs"]


def test_sigterm_during_metatrain_saves_the_state_and_marks_the_run_killed(project: Path) -> None:
    from mlflow import MlflowClient

    write_params(project, {"adv_scale": 0.5, "episode_train": 400, "tracking": True,
                           "metatrain.checkpoint_interval": 1000})  # no checkpoint but the one SIGTERM makes
    shutil.rmtree(project / "results" / "metatrain")
    proc = start(project, "metatrain", "--quiet")
    wait_for((project / "results" / "metatrain" / "bank" / "iter_000003.png").is_file, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM: the state of iteration ") and "again to resume" in last, err
    iteration = int(last.split("iteration ")[1].split()[0].rstrip(";"))
    state = torch.load(project / "models" / "meta" / "last.pt", map_location="cpu", weights_only=True)
    assert state["iteration"] == iteration >= 3
    rows = (project / "results" / "metatrain" / "train.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + iteration  # the curve saved with the state
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("purer").experiment_id])
    assert run.info.status == "KILLED"


def test_a_run_whose_process_was_killed_is_closed_by_the_next_stage(project: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    from purer_mlops.tracking import open_tracker

    write_params(project, {"adv_scale": 0.5, "episode_train": 400, "tracking": True})
    shutil.rmtree(project / "results" / "metatrain")
    proc = start(project, "metatrain", "--quiet")  # as a DVC queue worker runs it
    wait_for((project / "results" / "metatrain" / "bank" / "iter_000003.png").is_file, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("purer").experiment_id
    (killed,) = client.search_runs([experiment])
    assert killed.info.status == "RUNNING"  # nothing could end it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    with open_tracker(tiny_params(tracking=True), "metatest", project) as tracker:
        assert client.get_run(killed.info.run_id).info.status == "KILLED"
        assert "ended without closing it" in client.get_run(killed.info.run_id).data.tags["purer.closed_by"]
        assert client.get_run(tracker.run_id).info.status == "RUNNING"  # a live run is left alone


def test_model_files_get_the_usual_mode(trained: Path) -> None:
    files = [p for p in (trained / "models" / "meta").rglob("*") if p.is_file()]  # written by `purer metatrain`
    assert any(p.name == "best.safetensors" for p in files) and any(p.name == "last.pt" for p in files)
    modes = {str(p.relative_to(trained)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes  # umask 022: rw-r--r--, as fileio intends


def test_card_naming_another_backbone_is_named(project: Path) -> None:
    card = project / "models" / "meta" / "best.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "backbone": "resnet18"}))
    check_one_error_line(purer(project, "metatest", "--quiet"), "best.json says backbone resnet18", "weights are conv4")


def test_a_project_where_the_lock_cannot_be_made_is_one_line(project: Path) -> None:
    # As in a read-only project (root writes anyway, so the lock's path is taken by a folder:
    # the same OSError path as EACCES/EROFS)
    (project / ".purer.lock").unlink(missing_ok=True)
    (project / ".purer.lock").mkdir()
    before = (project / "results" / "metatest").exists()
    check_one_error_line(purer(project, "metatest", "--quiet"), "cannot create the working-copy lock", "writable")
    assert (project / "results" / "metatest").exists() == before


def test_adapt_into_a_folder_it_cannot_write_is_one_line(project: Path, tmp_path: Path) -> None:
    params = tiny_params()
    test, tasks = fixed_test_tasks(params, Project(project), 1)
    support, query = lay_out_task(test, tasks[0], tmp_path / "task")
    blocker = tmp_path / "results.txt"  # a file where the output's folder should be
    blocker.write_text("keep")
    out = blocker / "predictions.csv"
    check_one_error_line(purer(project, "adapt", str(support), str(query), "--out", str(out), "--quiet"),
                         f"could not write {out}", "nothing was changed")
    assert blocker.read_text() == "keep"


def test_a_new_run_killed_early_leaves_models_metatest_refuses(project: Path) -> None:
    write_params(project, {"adv_scale": 0.5, "episode_train": 400})  # another run, long enough to kill
    shutil.rmtree(project / "results" / "metatrain")
    proc = start(project, "metatrain", "--quiet")
    first_image = project / "results" / "metatrain" / "bank" / "iter_000000.png"
    wait_for(first_image.is_file, proc)  # the new run validated its start and wrote it as best
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    check_one_error_line(purer(project, "metatest", "--quiet"), "models/meta", "has not finished", "purer metatrain")
    write_params(project, {"episode_train": 12})  # control: a finished run's models are tested
    for command in (["metatrain", "--quiet"], ["metatest", "--quiet"]):
        done = purer(project, *command)
        assert done.returncode == 0, (command, done.stderr[-3000:])
    assert not (project / "models" / "meta" / "in_progress.json").exists()
