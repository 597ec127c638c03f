"""`purer summarize RUN_FOLDERS...`: settings compared over seeds from run folders (each the
`--root` of a real `purer metatrain`), meta-val alone where meta-test was not run.

Four tiny runs (adv_scale 0.5 and 10, seeds 0 and 1) share one real teacher pool; one of them is
also meta-tested. The summary's numbers are checked against the folders' own metrics.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import check_one_error_line, run_purer, tiny_raw, write_yaml
from scipy import stats

SETTINGS = (0.5, 10.0)
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def runs(pool_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``runs/adv<a>-s<seed>``, meta-trained by the CLI; ``adv10-s0`` meta-tested too."""
    base = tmp_path_factory.mktemp("summarize")
    write_yaml(base, tiny_raw())  # the project summarize runs in: tracking off
    for adv in SETTINGS:
        for seed in SEEDS:
            folder = base / "runs" / f"adv{adv:g}-s{seed}"
            folder.mkdir(parents=True)
            shutil.copytree(pool_project / "data", folder / "data")
            shutil.copytree(pool_project / "models" / "teachers", folder / "models" / "teachers")
            write_yaml(folder, tiny_raw(adv_scale=adv, seed=seed))
            proc = run_purer(folder, "metatrain", "--quiet")
            assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_purer(base / "runs" / "adv10-s0", "metatest", "--quiet")
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
    val = {adv: [metric(runs / "runs" / f"adv{adv:g}-s{s}", "metatrain", "val_best") for s in SEEDS]
           for adv in SETTINGS}
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
    assert float(rows["adv_scale=10"]["test_mean"]) == pytest.approx(metric(folders[2], "metatest", "test_acc"))
    assert math.isnan(float(rows["adv_scale=0.5"]["test_mean"] or "nan"))
    line = next(x for x in out.stdout.splitlines() if x.startswith("adv_scale=0.5"))
    assert f"{sum(diffs) / 2:+.2f}" in line and line.rstrip().endswith("n/a")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_without_a_finished_run_or_a_repeated_one_is_one_line(runs: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    write_yaml(empty, tiny_raw())
    check_one_error_line(run_purer(runs, "summarize", str(empty)), "no finished run", "purer metatrain --root")
    twin = tmp_path / "twin"
    shutil.copytree(runs / "runs" / "adv0.5-s0", twin)
    proc = run_purer(runs, "summarize", str(runs / "runs" / "adv0.5-s0"), str(twin))
    check_one_error_line(proc, "repeats run folder adv0.5-s0", "seed 0")
