#!/usr/bin/env python3
"""Follow one lane and two lanes side by side for a few meta-iterations, in float64.

In float64 the only difference between the two, the order of the sums that join the lanes'
shares, stays at rounding level; so a drift well above 1e-12 would mean that the lanes
compute something else (a race, a lost share). Run it in a project whose `models/teachers/`
and `data/` exist (after `dvc repro`):

    python scripts/lanes_drift.py --iterations 30

Each printed line: iteration, whether the bank update was adversarial (one lane, two lanes),
and the relative distance ‖two − one‖ / ‖one‖ of the bank and of the meta-model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from purer_mlops.config import load_params
from purer_mlops.lanes import open_lanes
from purer_mlops.paths import Project
from purer_mlops.stages.metatrain import build_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_equivalence import as_float64, flat, rel  # noqa: E402  (the equivalence tests' float64 helpers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="project root [.]")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--adv-start", type=int, default=2, help="first adversarial update (small: see several)")
    args = parser.parse_args()
    params = load_params(args.root / "params.yaml").replace(adv_start=args.adv_start, patience=2)
    one = as_float64(build_trainer(params, Project(args.root)))
    with open_lanes(2) as lanes:
        two = as_float64(build_trainer(params, Project(args.root), lanes=lanes))
        for _ in range(args.iterations):
            row_two, row_one = two.step(), one.step()
            print(f"{row_one['iteration']:4d}  adversarial {row_one['adversarial']} {row_two['adversarial']}  "
                  f"bank {rel(two.bank.images.detach(), one.bank.images.detach()):.1e}  "
                  f"model {rel(flat(two.model.parameters()), flat(one.model.parameters())):.1e}", flush=True)


if __name__ == "__main__":
    main()
