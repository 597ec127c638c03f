"""`purer summarize RUN_FOLDERS...`: settings compared over seeds from run folders, each made by
`scripts/sweep_metaval.py` (a real `purer metatrain --root`), meta-val alone where meta-test was
not run.

Four tiny runs (the project's adv_scale 10 and adv_scale 0.5, seeds 0 and 1) share one real
teacher pool; one of them is also meta-tested. The summary's numbers are checked against the
folders' own metrics.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, check_one_error_line, copy_project, run_purer, tiny_raw, tool_env, write_yaml
from scipy import stats

SETTINGS = {10.0: "default", 0.5: "adv0.5"}  # adv_scale → the folder names' setting
SEEDS = (0, 1)
SCRIPT = REPO / "scripts" / "sweep_metaval.py"


def sweep(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--project", str(project), "--out", str(project / "runs"),
                           *args], cwd=project, env=tool_env(), capture_output=True, text=True, timeout=600)


def folder(runs: Path, adv: float, seed: int) -> Path:
    return runs / "runs" / f"{SETTINGS[adv]}-s{seed}"


@pytest.fixture(scope="module")
def runs(pool_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose sweep ``runs/<setting>-s<seed>`` is meta-trained; ``default-s0`` meta-tested too."""
    base = copy_project(pool_project, tmp_path_factory.mktemp("summarize") / "project")
    write_yaml(base, tiny_raw(adv_scale=10.0))
    proc = sweep(base, "--seeds", "0,1", "adv0.5=adv_scale=0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (base / "runs").iterdir()) == ["adv0.5-s0", "adv0.5-s1", "default-s0", "default-s1"]
    assert (base / "runs/adv0.5-s1/models/teachers").resolve() == (base / "models/teachers").resolve()
    proc = run_purer(base / "runs" / "default-s0", "metatest", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return base


def metric(folder: Path, stage: str, key: str) -> float:
    return json.loads((folder / "results" / stage / "metrics.json").read_text())[key]


def test_run_folders_are_summarised_on_meta_val_and_paired_by_seed(runs: Path, tmp_path: Path) -> None:
    folders = sorted((runs / "runs").iterdir())
    out = run_purer(runs, "summarize", *map(str, folders), "--reference", "adv_scale=10",
                    "--csv", str(tmp_path / "s.csv"), "--plot", str(tmp_path / "s.png"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["setting"]: r for r in csv.DictReader((tmp_path / "s.csv").open())}
    assert set(rows) == {"adv_scale=0.5", "adv_scale=10"}
    val = {adv: [metric(folder(runs, adv, s), "metatrain", "val_best") for s in SEEDS] for adv in SETTINGS}
    for adv in SETTINGS:
        row = rows[f"adv_scale={adv:g}"]
        assert row["n"] == "2" and row["seeds"] == "0 1"
        assert float(row["val_mean"]) == pytest.approx(sum(val[adv]) / 2, abs=1e-9)
    diffs = [a - b for a, b in zip(val[0.5], val[10.0], strict=True)]
    assert float(rows["adv_scale=0.5"]["d_val"]) == pytest.approx(sum(diffs) / 2, abs=1e-9)
    if diffs[0] != diffs[1]:
        p = stats.ttest_rel(val[0.5], val[10.0]).pvalue
        assert float(rows["adv_scale=0.5"]["d_val_p"]) == pytest.approx(p, rel=1e-6)
    # meta-test: one run of the reference has it, the other setting none: n/a, not a difference
    assert float(rows["adv_scale=10"]["test_mean"]) == pytest.approx(metric(folder(runs, 10.0, 0), "metatest",
                                                                            "test_acc"))
    assert math.isnan(float(rows["adv_scale=0.5"]["test_mean"] or "nan"))
    line = next(x for x in out.stdout.splitlines() if x.startswith("adv_scale=0.5"))
    assert f"{sum(diffs) / 2:+.2f}" in line and line.rstrip().endswith("n/a")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_sweep_is_skipped_and_a_bad_setting_stops_it(runs: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in (runs / "runs").glob("*/results/metatrain/metrics.json")}
    again = sweep(runs, "--seeds", "0,1", "adv0.5=adv_scale=0.5")
    assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    typo = sweep(runs, "--seeds", "0", "--no-default", "adv_scael=0.5")
    assert typo.returncode == 1 and "adv_scael" in typo.stderr.strip().splitlines()[-1], typo.stderr[-2000:]
    assert not (runs / "runs" / "adv_scael-0.5-s0").exists()  # nothing half-made


def test_a_folder_without_a_finished_run_or_a_repeated_one_is_one_line(runs: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    write_yaml(empty, tiny_raw())
    check_one_error_line(run_purer(runs, "summarize", str(empty)), "no finished run", "purer metatrain --root")
    twin = tmp_path / "twin"
    shutil.copytree(runs / "runs" / "adv0.5-s0", twin, symlinks=True)
    proc = run_purer(runs, "summarize", str(runs / "runs" / "adv0.5-s0"), str(twin))
    check_one_error_line(proc, "repeats run folder adv0.5-s0", "seed 0")
