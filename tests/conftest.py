"""Shared fixtures and helpers: temporary project roots, tiny Glyph-FS, the real CLI and DVC.

Helpers are plain functions so tests can import them (``from conftest import run_purer``);
fixtures wrap the expensive ones. Nothing here is autouse.

Tests marked ``slow`` run the real pipeline end to end on tiny data; ``pytest -q`` runs them
too, ``pytest -q -m "not slow"`` leaves them out for a quick check.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
import torch
import yaml

from purer_mlops.config import Params, from_dict
from purer_mlops.data.filelist import write_filelists
from purer_mlops.data.registry import DATASETS
from purer_mlops.models.backbones import build_backbone
from purer_mlops.models.learners import LEARNERS, MetaLearner
from purer_mlops.models.pool_storage import TeacherRecord, save_pool
from purer_mlops.paths import Project
from purer_mlops.stages import metatrain as train
from purer_mlops.stages import pretrain

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's bin/: `purer`, `dvc`, `actionlint`
TINY_IMAGES_PER_CLASS = 20
# Tests of every meta-learner take the names from the learners' registry, and the subsets by capability.
LEARNER_NAMES = tuple(LEARNERS)
INNER_LOOP_LEARNERS = tuple(k for k, c in LEARNERS.items() if c.inner_loss is not MetaLearner.inner_loss)
HEAD_LEARNERS = tuple(k for k, c in LEARNERS.items() if not c.metric_based)
GLYPHS_CLASSES = {"meta_train": 64, "meta_val": 16, "meta_test": 20}

# Files and folders a fresh clone brings that DVC needs (dvc.yaml deps, config, ignores).
CLONE_FILES = ("params.yaml", "dvc.yaml", ".gitignore", ".dvcignore", ".dvc/config",
               ".dvc/.gitignore", "data/raw/README.md", "pyproject.toml")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for in-process work: the tests' models are tiny, and on a small shared
    CPU two threads contend and run many times slower (subprocesses get OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- parameters


def read_params(root: Path) -> dict[str, Any]:
    """The raw mapping of ``root/params.yaml``."""
    return yaml.safe_load((Path(root) / "params.yaml").read_text()) or {}


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (top-level, or dotted ``section.key``) in a raw params mapping."""
    section, _, sub = key.partition(".")
    if sub:
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        raw[section][sub] = value
    else:
        raw[key] = value


def write_params(root: Path, overrides: dict[str, Any] | None = None, /, **kw: Any) -> Path:
    """Change keys of ``root/params.yaml`` and write it back; returns the file's path.

    Dotted keys address sections: ``write_params(root, {"glyphs.images_per_class": 20})``;
    top-level keys may also be keywords: ``write_params(root, adv_scale=0.5)``.
    Unknown keys are written as given (tests of validation need them).
    """
    path = Path(root) / "params.yaml"
    raw = read_params(root)
    for key, value in {**(overrides or {}), **kw}.items():
        set_key(raw, key, value)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def new_project(root: Path) -> Path:
    """Make ``root`` a project root holding a copy of the repository's ``params.yaml``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A temporary project root with a copy of the repository's ``params.yaml``."""
    return new_project(tmp_path / "project")


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def tiny_glyphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Glyph-FS with 20 images per class plus its filelists, generated once per session.

    Returns the dataset root (``.../glyphs`` holding ``meta_*/`` and ``split/``). Treat it as
    read-only: copy it (:func:`copy_glyphs`) before changing anything.
    """
    from purer_mlops.data.filelist import write_filelists
    from purer_mlops.data.glyphs import generate

    root = tmp_path_factory.mktemp("tiny_glyphs") / "glyphs"
    generate(root, seed=0, images_per_class=TINY_IMAGES_PER_CLASS, progress=False)
    write_filelists(root)
    return root


def copy_glyphs(tiny: Path, project_root: Path) -> Path:
    """Copy a generated Glyph-FS tree to ``project_root/data/glyphs``; returns that folder."""
    dest = Path(project_root) / "data" / "glyphs"
    shutil.copytree(tiny, dest)
    return dest


@pytest.fixture
def glyphs_project(project: Path, tiny_glyphs: Path) -> Path:
    """A project root with tiny Glyph-FS under ``data/glyphs`` and matching params.yaml."""
    copy_glyphs(tiny_glyphs, project)
    write_params(project, {"glyphs.images_per_class": TINY_IMAGES_PER_CLASS})
    return project


# --------------------------------------------------------------------------- subprocesses


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for subprocesses: the venv's bin first on PATH, no DVC analytics, one thread
    per process (tiny models: two threads contend on a small CPU and run several times slower)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("GIT_AUTHOR_NAME", "purer-tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@purer.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "purer-tests")
    env.setdefault("GIT_COMMITTER_EMAIL", "tests@purer.invalid")
    env.update(extra or {})
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in ``cwd`` with :func:`tool_env`; text output captured."""
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(env), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def run_purer(root: Path, *args: str, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (``python -m purer_mlops ARGS``) with ``cwd=root``."""
    return run([sys.executable, "-m", "purer_mlops", *args], cwd=Path(root), timeout=timeout,
               env=env)


def check_one_error_line(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """A CLI run that exited 2 with one ``error: ...`` line holding every word; returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def run_dvc(root: Path, *args: str, timeout: float = 600, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the venv's ``dvc ARGS`` in ``root`` (``purer`` resolves to the venv's too)."""
    return run([str(BIN / "dvc"), *args], cwd=Path(root), timeout=timeout, check=check, env=env)


def git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``git ARGS`` in ``root``; a failure raises with its output."""
    return run(["git", *args], cwd=Path(root), check=True)


def make_dvc_repo(root: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Make ``root`` look like a fresh clone: git repo, DVC config, ``src/``, one commit.

    ``overrides`` change params.yaml before the commit (dotted keys for sections). The
    package ``purer`` runs is the installed one; ``src/`` is copied because dvc.yaml lists
    source files as dependencies.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for rel in CLONE_FILES:
        if (REPO / rel).exists():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    if (REPO / "compare").is_dir():
        shutil.copytree(REPO / "compare", root / "compare",
                        ignore=shutil.ignore_patterns("*.lock", "__pycache__"))
    shutil.copytree(REPO / "src", root / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    if overrides:
        write_params(root, overrides)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "clone")
    return root


# params.yaml overrides that make a fresh clone's whole pipeline run in seconds: tiny Glyph-FS,
# two random teachers, first-order MAML, four meta-iterations, ten test tasks. Teachers of one
# epoch are near chance, so the teacher accuracy floor is off (tests of it set their own).
CLONE_TINY: dict[str, Any] = {
    "glyphs.images_per_class": TINY_IMAGES_PER_CLASS,
    "pretrain.epochs": 1, "pretrain.min_accuracy": 0.0,
    "pool_mode": "random", "APInum": 2,
    "episode_train": 8, "episode_batch": 2,  # 4 meta-iterations
    "num_qur_train": 5, "num_qur_test": 5, "synthesis_per_class": 6,
    "approx": True, "test_inner_update_num": 2,
    "adv_start": 1, "episode_test": 10,
    "metatrain.val_interval": 2, "metatrain.val_episodes": 5,
    "metatrain.checkpoint_interval": 2, "metatrain.image_interval": 2,
}


def reproduced_repo(root: Path, overrides: dict[str, Any] | None = None) -> Path:
    """:func:`make_dvc_repo`, then `dvc repro` and a commit of its results: the baseline that
    `dvc exp run` compares experiments with."""
    root = make_dvc_repo(root, overrides)
    run_dvc(root, "repro", check=True)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "baseline")
    return root


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A fresh-clone-like git + DVC repository with tiny Glyph-FS params (not yet run)."""
    return make_dvc_repo(tmp_path / "repo", {"glyphs.images_per_class": TINY_IMAGES_PER_CLASS})


# --------------------------------------------------------------------------- tiny meta-training projects

TINY: dict[str, Any] = {
    "dataset": "glyphs", "seed": 0, "glyphs": {"images_per_class": 20},
    "pretrain": {"epochs": 1, "batch_size": 32, "min_accuracy": 0.0},  # one epoch: near-chance teachers
    "way_train": 5, "num_sup_train": 1, "num_qur_train": 2, "synthesis_per_class": 3,
    "episode_train": 12, "episode_batch": 2, "inner_update_num": 1,
    "way_test": 5, "num_sup_test": 1, "num_qur_test": 3, "test_inner_update_num": 1,
    "adv_start": 2, "patience": 1, "tracking": False, "device": "cpu",
    "metatrain": {"val_interval": 2, "val_episodes": 4, "checkpoint_interval": 2, "image_interval": 3},
}


def tiny_raw(**changes: Any) -> dict[str, Any]:
    """The raw params mapping of a tiny run; dotted keys (``metatrain.batched``) reach sections."""
    raw = yaml.safe_load(yaml.safe_dump(TINY))  # deep copy
    for key, value in changes.items():
        section, _, sub = key.partition(".")
        if sub:
            raw.setdefault(section, {})[sub] = value
        else:
            raw[key] = value
    return raw


def tiny_params(**changes: Any) -> Params:
    return from_dict(tiny_raw(**changes))


def small_glyphs(tiny: Path, root: Path, train_classes: int = 10, other_classes: int = 5) -> Path:
    """``root/data/glyphs``: the first classes of the session's tiny Glyph-FS, with filelists."""
    dest = Path(root) / "data" / "glyphs"
    for split, n in (("meta_train", train_classes), ("meta_val", other_classes), ("meta_test", other_classes)):
        for cls in sorted(p for p in (tiny / split).iterdir() if p.is_dir())[:n]:
            shutil.copytree(cls, dest / split / cls.name)
    write_filelists(dest)
    return dest


def random_pool(folder: Path, specs: list[tuple[str, int, tuple[int, ...]]], seed: int = 0) -> list[TeacherRecord]:
    """Untrained teachers ``(arch, image_size, class_ids)`` saved as a pool.

    A few train-mode passes on noise give them non-trivial BatchNorm running statistics.
    """
    info = DATASETS["glyphs"]

    def teachers():
        for i, (arch, size, ids) in enumerate(specs):
            torch.manual_seed(seed + i)
            model = build_backbone(arch, len(ids), size).train()
            with torch.no_grad():
                for _ in range(2):
                    model(torch.randn(8, 3, size, size))
            yield TeacherRecord(arch, "glyphs", size, info.mean, info.std,
                                tuple(f"class_{c:02d}" for c in ids), tuple(ids)), model.eval()

    return save_pool(folder, teachers())




def write_yaml(root: Path, raw: dict[str, Any]) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))




@pytest.fixture(scope="module")
def pool_project(tmp_path_factory: pytest.TempPathFactory, tiny_glyphs: Path) -> Path:
    """10 meta-train classes and a real pool of 2 conv4 teachers (1 epoch). Copy before use."""
    root = tmp_path_factory.mktemp("pool_project")
    small_glyphs(tiny_glyphs, root)
    write_yaml(root, tiny_raw())
    pretrain.run(tiny_params(), Project(root), progress=False)
    return root


def copy_project(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("results"))
    return dest


# --------------------------------------------------------------------------- a meta-model to adapt

QUERY = 15


def adapt_raw(**changes) -> dict:
    """Tiny meta-training whose meta-test tasks are 5-way with 15 queries per class."""
    return tiny_raw(num_qur_test=QUERY, test_inner_update_num=2, **changes)


def adapt_params(**changes):
    return from_dict(adapt_raw(**changes))


@pytest.fixture(scope="module")
def adapt_project(pool_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with a tiny meta-trained MAML model in models/meta/ (tracking off)."""
    root = copy_project(pool_project, tmp_path_factory.mktemp("adapt") / "project")
    write_yaml(root, adapt_raw())
    train.run(adapt_params(), Project(root), progress=False)
    return root


def lay_out_task(test, task, folder: Path) -> tuple[Path, Path]:
    """The task as folders: support/<k>_<class>/<i>_<file>, query/<k>_<class>/<j>_<file>, named so
    that sorting gives the task's class order (label k) and its image order."""
    classes, support, query = task
    paths = [Path(p) for p, _ in _filelist(test)]
    for k, c in enumerate(classes.tolist()):
        name = f"{k}_{test.classes[c]}"
        for role, indices in (("support", support[k]), ("query", query[k])):
            dest = folder / role / name
            dest.mkdir(parents=True)
            for i, index in enumerate(indices.tolist()):
                shutil.copy(paths[index], dest / f"{i:02d}_{paths[index].name}")
    return folder / "support", folder / "query"


def _filelist(test):
    from purer_mlops.data.filelist import read_filelist

    return read_filelist(test.source.parent.parent, "meta_test")  # .../glyphs/split/meta_test.csv


# --------------------------------------------------------------------------- local servers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def background(cmd: list[str], ready: str, log: Path, env: dict | None = None, cwd: Path | None = None
               ) -> Iterator[None]:
    """Run ``cmd`` until the block ends, once ``ready`` (a URL) answers; its own process group."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=tool_env(env), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{cmd[:3]} did not answer in 120 s: {log.read_text()[-3000:]}"
            try:
                with urlopen(ready, timeout=5):
                    break
            except OSError:
                time.sleep(1)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
