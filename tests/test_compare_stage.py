"""The comparison table as users run it: `dvc repro compare/dvc.yaml` in a fresh clone.

Tiny data and four meta-iterations per model; what is checked is the pipeline around the
numbers: the main `dvc repro` leaves the table alone, the compare stage reuses the main
pipeline's 1-shot PURER model (its row equals the metatest stage's accuracy on the same
tasks), trains only what it lacks, writes the table, and a second run does nothing.
"""

from __future__ import annotations

import json

import pytest
from conftest import CLONE_TINY, make_dvc_repo, run_dvc

from purer_mlops.config import METHODS

pytestmark = pytest.mark.slow


def test_dvc_repro_compare_builds_the_table_from_the_main_pipeline(tmp_path):
    root = make_dvc_repo(tmp_path / "repo", {**CLONE_TINY, "calibration.inversion_steps": 2})
    run_dvc(root, "repro", check=True)
    assert not (root / "results" / "compare").exists()  # not part of the default run

    out = run_dvc(root, "repro", "compare/dvc.yaml", check=True).stdout
    assert "Running stage 'compare/dvc.yaml:compare'" in out
    assert "Running stage 'metatrain'" not in out  # upstream stages are up to date

    rows = json.loads((root / "results/compare/compare.json").read_text())
    cells = {(r["method"], r["shot"]): r for r in rows}
    heads = [f"{m}+proto" for m in ("random", "average", "ei", "purer", "oracle")]  # nearest prototype
    assert set(cells) == {(m, s) for m in [*METHODS, *heads] for s in (1, 5)}
    for r in rows:
        assert r["episodes"] == 10 and 0.0 <= r["accuracy"] <= 100.0 and r["ci95"] >= 0.0
    # The 1-shot PURER row is the main pipeline's model on the same fixed tasks.
    metatest = json.loads((root / "results/metatest/details.json").read_text())
    assert cells[("purer", 1)]["accuracy"] == pytest.approx(metatest["accuracy"], abs=1e-9)
    assert cells[("purer+proto", 1)]["accuracy"] == pytest.approx(metatest["prototype"]["accuracy"], abs=1e-9)
    assert sorted(p.name for p in (root / "models/compare").iterdir()) == [
        "ei-1shot", "ei-5shot", "oracle-1shot", "oracle-5shot", "purer-5shot"]

    table = (root / "results/compare/compare.md").read_text()
    assert "5-way 1-shot" in table and "5-way 5-shot" in table and "| purer+icfil |" in table
    assert (root / "results/compare/compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paired = json.loads((root / "results/compare/paired.json").read_text())
    assert {(d["a"], d["b"], d["shot"]) for d in paired} >= {("purer", "random", 1), ("purer", "random", 5)}

    again = run_dvc(root, "repro", "compare/dvc.yaml", check=True).stdout
    assert "Running stage" not in again
