"""A bad `-S` value stops `dvc exp run` before any stage replaces its outputs.

The pipeline's first stage, `check` (`purer params --check`), depends on every key of
params.yaml and every other stage depends on its marker: DVC runs it first, and when it
refuses the file nothing downstream runs, so nothing is removed. Tested through the real
`dvc exp run` in a fresh-clone-like repository after `dvc repro`: a value of the wrong kind,
an unknown key (`+key=value`), a value out of range for the first stage (pretrain's).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import CLONE_TINY, git, reproduced_repo, run_dvc


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return reproduced_repo(tmp_path_factory.mktemp("gate") / "repo", CLONE_TINY)


def outputs(root: Path) -> dict[str, str]:
    """Every file the pipeline wrote (data, models, results) with the hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("data", "models", "results") for p in sorted((root / folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("setting, words", [
    ("distill.start=BEST", ["'distill.start' is 'BEST'", "choose one of"]),
    ("+no_such_key=1", ["unknown key 'no_such_key'"]),
    ("pretrain.batch_size=0", ["'pretrain.batch_size' is 0", "at least 1"]),
])
def test_a_bad_setting_stops_before_any_output_is_replaced(repo: Path, setting: str, words: list[str]) -> None:
    before = outputs(repo)
    proc = run_dvc(repo, "exp", "run", "-S", setting)
    assert proc.returncode != 0
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: params.yaml")]
    assert all(w in line for w in words), line
    assert "No stage ran" in line and "`git show HEAD:params.yaml > params.yaml`" in line
    assert "Running stage 'check'" in proc.stdout and "Running stage 'prepare'" not in proc.stdout
    assert "Running stage 'pretrain'" not in proc.stdout and "Running stage 'metatrain'" not in proc.stdout
    assert outputs(repo) == before  # teachers, meta-model, results: byte for byte
    (repo / "params.yaml").write_text(git(repo, "show", "HEAD:params.yaml").stdout)  # the printed recovery
    status = run_dvc(repo, "status", "--with-deps", "metatest", check=True)  # the main pipeline
    assert "up to date" in status.stdout, status.stdout
