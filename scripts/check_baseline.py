#!/usr/bin/env python3
"""Check a fresh `dvc repro` against the committed baseline (dvc.lock and results/ on main).

Run it in a clone after `dvc repro`:

    python scripts/check_baseline.py            # compare with HEAD's dvc.lock and results/
    python scripts/check_baseline.py --record   # after a new baseline run: note its machine

What must hold where (docs/reliability.md, "What is reproducible"):

- data (`prepare`, `filelist`): the same bytes on every machine, so the same hashes;
- teachers and meta-model (`pretrain`, `metatrain`): the same bytes on the same CPU model,
  torch version and thread count as the baseline (results/baseline.json), else not compared;
- meta-test accuracy: on any machine within the combined 95% interval of the two runs,
  |a − a₀| ≤ √(h² + h₀²).

Exit status 0 when everything that can be compared agrees, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import yaml

DATA_STAGES = ("prepare", "filelist")
MODEL_STAGES = ("pretrain", "metatrain")
MACHINE_FILE = Path("results/baseline.json")
METATEST = Path("results/metatest/metrics.json")


def machine() -> dict:
    """What makes two runs bit-comparable: CPU model, torch version, threads."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads()}


def committed(rev: str, path: Path) -> str | None:
    """The text of ``path`` at git revision ``rev``, or None when it is not committed there."""
    proc = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def out_hashes(lock: dict, stage: str, under: str = "") -> dict[str, str]:
    """``{path: md5}`` of one stage's outputs (those whose path starts with ``under``) in a parsed dvc.lock."""
    outs = lock.get("stages", {}).get(stage, {}).get("outs", [])
    return {o["path"]: o.get("md5", "") for o in outs if o["path"].startswith(under)}


def compare_stage(stage: str, base: dict, now: dict, under: str = "") -> list[str]:
    """Problems of one stage: outputs (under ``under``) missing from the new lock or with other hashes."""
    old, new = out_hashes(base, stage, under), out_hashes(now, stage, under)
    if not old:
        return [f"{stage}: not in the baseline's dvc.lock"]
    return [f"{stage}: {path} is {new.get(path) or 'missing'}, baseline {md5}"
            for path, md5 in old.items() if new.get(path) != md5]


def compare_accuracy(base: dict, now: dict) -> tuple[bool, str]:
    """Meta-test accuracies agree within the two runs' combined 95% interval (the headline keys of
    results/metatest/metrics.json, src/purer_mlops/stages/headline.py)."""
    a, h = now["test_acc"], now["test_ci"]
    a0, h0 = base["test_acc"], base["test_ci"]
    bound = math.hypot(h, h0)
    ok = abs(a - a0) <= bound
    return ok, f"meta-test {a:.2f} ± {h:.2f} vs baseline {a0:.2f} ± {h0:.2f}: |Δ| {abs(a - a0):.2f} ≤ {bound:.2f}"


def check(rev: str) -> int:
    base_lock = committed(rev, Path("dvc.lock"))
    if base_lock is None:
        print(f"no dvc.lock committed at {rev}: nothing to compare with", file=sys.stderr)
        return 1
    base, now = yaml.safe_load(base_lock), yaml.safe_load(Path("dvc.lock").read_text())
    failures: list[str] = []
    for stage in DATA_STAGES:
        problems = compare_stage(stage, base, now)
        failures += problems
        print(f"{stage}: {'FAIL' if problems else 'same data hashes'}")
    recorded = json.loads(committed(rev, MACHINE_FILE) or "{}").get("machine")
    here = machine()
    if recorded == here:
        for stage in MODEL_STAGES:
            # the weights under models/; the stages' details.json carry wall times, never equal twice
            problems = compare_stage(stage, base, now, under="models/")
            failures += problems
            print(f"{stage}: {'FAIL' if problems else 'same model hashes (same machine kind)'}")
    else:
        print(f"models: not compared, baseline machine {recorded}, this one {here} "
              "(bit-identical only on the same CPU model, torch and threads)")
    base_test = committed(rev, METATEST)
    if base_test and METATEST.is_file():
        ok, line = compare_accuracy(json.loads(base_test), json.loads(METATEST.read_text()))
        print(("" if ok else "FAIL ") + line)
        failures += [] if ok else [line]
    for line in failures:
        print(f"  {line}", file=sys.stderr)
    return 1 if failures else 0


def record() -> int:
    """Write results/baseline.json: the machine and date of the run in this workspace."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    info = {"machine": machine(), "date": datetime.date.today().isoformat(), "code_commit": commit}
    MACHINE_FILE.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="HEAD", help="git revision holding the baseline (default HEAD)")
    parser.add_argument("--record", action="store_true", help="write results/baseline.json for a new baseline")
    args = parser.parse_args()
    return record() if args.record else check(args.against)


if __name__ == "__main__":
    sys.exit(main())
