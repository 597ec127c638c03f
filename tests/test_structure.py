"""The code's shape and its single sources of truth, checked.

- size limits: no function over 60 lines or 8 parameters, no module over 400 lines;
- every module a stage's code imports is a dependency of that stage in dvc.yaml (editing it
  re-runs the stage), infrastructure that cannot change a stage's outputs aside;
- each stage's ``params:`` lists exactly the knobs declared as read by it;
- docs/parameters.md is what ``purer params --markdown`` prints.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_purer
from test_layers import runtime_imports

from purer_mlops.config.derived import dvc_params_problems

SRC = REPO / "src"
PACKAGE = SRC / "purer_mlops"
# The module doing each stage's work (the CLI is a thin layer over it).
STAGE_ENTRIES = {
    "prepare": ["purer_mlops.stages.prepare", "purer_mlops.data.glyphs", "purer_mlops.data.sources"],
    "filelist": ["purer_mlops.stages.filelists", "purer_mlops.data.filelist"],
    "pretrain": ["purer_mlops.stages.pretrain"],
    "metatrain": ["purer_mlops.stages.metatrain"],
    "metatest": ["purer_mlops.stages.metatest"],
}
# Modules (and packages) that move bytes, report or coordinate, but never change what a stage
# computes; what they import is theirs (the MLflow models logged by ``serve.logged_model`` and registered
# by ``serve.registry`` are no DVC output).
INFRASTRUCTURE = {"purer_mlops.errors", "purer_mlops.fileio", "purer_mlops.paths", "purer_mlops.tracking",
                  "purer_mlops.distributed", "purer_mlops.interrupts", "purer_mlops.compiling",
                  "purer_mlops.serve.logged_model", "purer_mlops.serve.registry", "purer_mlops.children"}


def _infrastructure(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in INFRASTRUCTURE)


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _function_sizes():
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                count = len(names) - (names[:1] in (["self"], ["cls"])) + bool(args.vararg) + bool(args.kwarg)
                yield f"{path.relative_to(SRC)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1, count


def test_functions_and_modules_stay_small() -> None:
    sizes = list(_function_sizes())
    assert sizes
    assert [(where, lines) for where, lines, _ in sizes if lines > 60] == []
    assert [(where, n) for where, _, n in sizes if n > 8] == []
    assert [str(p) for p in _modules() if len(p.read_text().splitlines()) > 400] == []


def _module_file(name: str) -> Path:
    base = SRC / Path(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _imports(name: str) -> set[str]:
    """Package modules ``name`` imports at run time (``if TYPE_CHECKING:`` blocks skipped)."""
    path = _module_file(name)
    return runtime_imports(path, name if path.name == "__init__.py" else name.rpartition(".")[0])


def _closure(entries: list[str]) -> set[str]:
    seen, todo = set(), list(entries)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            if not _infrastructure(name):
                todo += sorted(_imports(name))
    return seen


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRIES))
def test_every_module_a_stage_runs_is_one_of_its_dependencies(stage: str) -> None:
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]
    covered = [REPO / d for d in deps]
    modules = {m for m in _closure(STAGE_ENTRIES[stage]) if not _infrastructure(m)}
    files = [_module_file(m) for m in sorted(modules) if m != "purer_mlops"]  # the package's own __init__
    missing = [str(f.relative_to(REPO)) for f in files if not any(f == d or d in f.parents for d in covered)]
    assert set(STAGE_ENTRIES[stage]) < modules
    assert missing == [], f"dvc.yaml stage '{stage}' does not depend on code it runs"


def test_dvc_yaml_params_match_the_knob_declarations() -> None:
    assert dvc_params_problems((REPO / "dvc.yaml").read_text()) == []


def test_dvc_params_check_notices_a_missing_knob() -> None:
    text = (REPO / "dvc.yaml").read_text().replace("      - adv_scale\n", "", 1)
    assert "stage 'metatrain' reads 'adv_scale' but its params: does not list it" in dvc_params_problems(text)


def test_parameters_doc_is_generated_from_the_declarations(tmp_path: Path) -> None:
    out = run_purer(tmp_path, "params", "--markdown")
    assert out.returncode == 0, out.stderr
    assert "| `adv_scale` | `10.0` |" in out.stdout
    assert (REPO / "docs" / "parameters.md").read_text() == out.stdout, \
        "docs/parameters.md is stale: run `purer params --markdown > docs/parameters.md`"
