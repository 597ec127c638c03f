#!/usr/bin/env python3
"""Lay out a held-out few-shot task from a prepared dataset's meta_test classes, in the form
`purer adapt` reads: OUT/support/<class>/<image> and OUT/query/<class>/<image>.

    python scripts/heldout_task.py task --shots 5          # 5 classes, 5 shots, 15 queries each
    purer adapt task/support task/query --out task/predictions.csv

Classes and images are drawn with ``--seed``; the images are copied, never moved.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path


def layout(source: Path, out: Path, ways: int, shots: int, queries: int, seed: int) -> list[str]:
    """Copy ``shots`` support and ``queries`` query images of ``ways`` classes; their names.

    Everything is checked before the first copy, and the copies go to a temporary sibling
    renamed to ``out`` at the end, so a refused request leaves nothing behind.
    """
    classes = sorted(p for p in source.iterdir() if p.is_dir()) if source.is_dir() else []
    if len(classes) < ways:
        raise SystemExit(f"error: {source} has {len(classes)} classes, fewer than --ways {ways}")
    rng = random.Random(seed)
    plan = {}
    for folder in rng.sample(classes, ways):
        images = sorted(p for p in folder.iterdir() if p.is_file())
        if len(images) < shots + queries:
            raise SystemExit(f"error: {folder} has {len(images)} images, fewer than --shots + --queries")
        plan[folder.name] = rng.sample(images, shots + queries)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, picked in plan.items():
        for part, files in (("support", picked[:shots]), ("query", picked[shots:])):
            (tmp / part / name).mkdir(parents=True)
            for f in files:
                shutil.copy2(f, tmp / part / name / f.name)
    tmp.rename(out)
    return list(plan)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="new folder for support/ and query/")
    parser.add_argument("--data", type=Path, default=Path("data/glyphs"), help="prepared dataset root")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; name a new folder")
    names = layout(args.data / "meta_test", args.out, args.ways, args.shots, args.queries, args.seed)
    print(f"{args.out}: {args.ways} classes ({', '.join(names)}), {args.shots} shots, {args.queries} queries each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
