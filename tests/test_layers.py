"""The package's layers, checked from its imports (``if TYPE_CHECKING:`` imports aside).

A *room* is a folder of ``src/purer_mlops`` (``meta``, ``stages``, ...) or a top-level module
(``fileio``, ``lanes``, ...); an arrow is "some module of room A imports a module of room B".

- the domain rooms (data, models, teachers, meta, serve) import neither ``tracking``, nor
  ``stages``, nor ``cli``; ``tracking`` imports no domain room (nor ``config``);
- no two rooms import each other, directly or round a loop;
- the drawing in docs/architecture.md has exactly the arrows the imports have;
- no module of the package imports the plain yardstick (``meta/plain_reference.py``): only tests
  and benchmarks do.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "src" / "purer_mlops"
DOMAIN = {"data", "models", "teachers", "meta", "serve"}
ABOVE_DOMAIN = {"tracking", "stages", "cli"}
# Used by every layer and using none of the drawn rooms: not drawn, checked instead.
INFRASTRUCTURE = {"errors", "fileio", "paths", "distributed", "interrupts", "compiling", "lanes", "children"}
ENTRY = {"__main__", "__init__"}  # `python -m purer_mlops` and the package's own __init__
YARDSTICK = "purer_mlops.meta.plain_reference"


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_file(name: str) -> Path:
    base = PACKAGE.parent / Path(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def runtime_imports(path: Path, package: str) -> set[str]:
    """Modules of the package imported at run time by the file at ``path`` (in ``package``);
    ``from p import x`` imports the module ``p.x`` when there is one, else ``p``."""
    tree = ast.parse(path.read_text())
    # ast.walk queues a node's children before yielding it: collect the typing-only imports first
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.add(candidate if _module_file(candidate).is_file() else base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("purer_mlops")}


def _modules() -> list[tuple[Path, str, str]]:
    """(file, its package, its module name) of every module of the package."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = ".".join(parts[:-1])
        out.append((path, package, package if parts[-1] == "__init__" else ".".join(parts)))
    return out


def yardstick_importers(modules: list[tuple[Path, str, str]]) -> list[str]:
    """The modules, the yardstick aside, with an import statement naming it (typing-only ones too)."""
    name = YARDSTICK.rsplit(".", 1)[1]
    return [module for path, _, module in modules if module != YARDSTICK
            and any(isinstance(n, ast.Import | ast.ImportFrom) and name in ast.unparse(n)
                    for n in ast.walk(ast.parse(path.read_text())))]


def import_arrows() -> dict[str, set[str]]:
    """room → the rooms its modules import (itself left out)."""
    arrows: dict[str, set[str]] = {}
    for path, package, module in _modules():
        room = _room(module)
        targets = {_room(m) for m in runtime_imports(path, package)} - {room}
        arrows.setdefault(room, set()).update(targets)
    return arrows


def drawn_arrows(text: str) -> dict[str, set[str]]:
    """The arrows of the drawing: the lines ``room ──► a, b`` (or a lone ``room``) of the fenced
    block after the heading "## The house"."""
    block = text.split("## The house", 1)[1].split("```", 2)[1]
    arrows: dict[str, set[str]] = {}
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        room, _, rest = line.partition("──►")
        arrows[room.strip()] = {r.strip() for r in rest.split(",") if r.strip()}
    return arrows


def drawing_problems(drawn: dict[str, set[str]], actual: dict[str, set[str]]) -> list[str]:
    """What the drawing says that the imports do not, and the other way round."""
    problems = []
    for room in sorted(set(drawn) | set(actual)):
        if room in INFRASTRUCTURE | ENTRY:
            continue
        want = drawn.get(room)
        have = actual.get(room, set()) - INFRASTRUCTURE - ENTRY
        if want is None:
            problems.append(f"room '{room}' is not drawn")
        elif want != have:
            problems += [f"drawn but not imported: {room} ──► {r}" for r in sorted(want - have)]
            problems += [f"imported but not drawn: {room} ──► {r}" for r in sorted(have - want)]
    return problems


def cycles(arrows: dict[str, set[str]]) -> list[list[str]]:
    """The loops of the room graph, each as the rooms round it (depth-first search)."""
    found, state = [], {}

    def visit(room: str, path: list[str]) -> None:
        state[room] = "open"
        for nxt in sorted(arrows.get(room, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[room] = "done"

    for room in sorted(arrows):
        if room not in state:
            visit(room, [room])
    return found


def test_domain_rooms_import_no_tracking_stages_or_cli() -> None:
    arrows = import_arrows()
    assert DOMAIN <= set(arrows)
    assert {room: sorted(arrows[room] & ABOVE_DOMAIN) for room in DOMAIN if arrows[room] & ABOVE_DOMAIN} == {}


def test_tracking_imports_no_domain_room() -> None:
    assert import_arrows()["tracking"] & (DOMAIN | {"config", "stages", "cli"}) == set()


def test_infrastructure_uses_no_drawn_room() -> None:
    arrows = import_arrows()
    assert {room: sorted(arrows.get(room, set()) - INFRASTRUCTURE) for room in INFRASTRUCTURE
            if arrows.get(room, set()) - INFRASTRUCTURE} == {}


def test_no_import_cycle_between_rooms() -> None:
    assert cycles(import_arrows()) == []


def test_cycle_search_finds_a_loop() -> None:
    assert cycles({"meta": {"tracking"}, "tracking": {"serve"}, "serve": {"meta"}}) == [
        ["meta", "tracking", "serve", "meta"]]


def test_the_drawing_in_architecture_md_has_the_arrows_of_the_imports() -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    assert drawing_problems(drawn_arrows(text), import_arrows()) == []


@pytest.mark.parametrize("edit", ["drop", "add"])
def test_a_wrong_drawing_is_noticed(edit: str) -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    line = re.search(r"^stages +──► .*$", text, re.M)
    assert line is not None
    wrong = line.group(0).replace("tracking, ", "") if edit == "drop" else line.group(0) + ", cli"
    problems = drawing_problems(drawn_arrows(text.replace(line.group(0), wrong)), import_arrows())
    expected = {"drop": "imported but not drawn: stages ──► tracking", "add": "drawn but not imported: stages ──► cli"}
    assert problems == [expected[edit]]


def test_only_tests_and_benchmarks_import_the_plain_yardstick() -> None:
    assert _module_file(YARDSTICK).is_file()
    assert yardstick_importers(_modules()) == []


@pytest.mark.parametrize("line", ["from .plain_reference import plain_terms",
                                  "from purer_mlops.meta import plain_reference",
                                  "import purer_mlops.meta.plain_reference"])
def test_a_production_module_importing_the_yardstick_is_noticed(tmp_path: Path, line: str) -> None:
    inversion = PACKAGE / "meta" / "inversion.py"
    edited = tmp_path / "inversion.py"
    edited.write_text(inversion.read_text() + "\n" + line + "\n")
    assert yardstick_importers([(edited, "purer_mlops.meta", "purer_mlops.meta.inversion")]) == [
        "purer_mlops.meta.inversion"]
