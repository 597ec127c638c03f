"""Meta-train settings over seeds into run folders, for `purer summarize` on META-VAL only.

    python scripts/sweep_metaval.py --out runs --seeds 0,1,2 outer_lr=0.003 inner_lr=0.05 \\
        'adv=adv_scale=0.5' 'small=synthesis_per_class=4,outer_lr=0.003'
    purer summarize runs/* --reference outer_lr=0.001 --markdown sweep.md

Each SETTING is ``[name=]key=value[,key=value...]`` (dotted keys reach sections, values read as
YAML); the project's params.yaml as it is, the reference, is swept too (``default``) unless
``--no-default``. Every setting × seed gets a folder ``<out>/<name>-s<seed>``: the project's
params with the setting's values, the seed and ``tracking: false``, the project's ``data/`` and
``models/teachers/`` linked (so the seed varies meta-training alone, on the same teachers), and
``purer metatrain --root`` run in it. Meta-test is never run: choose on meta-val, then meta-test
the chosen setting once (``purer metatest --root <folder>``). A folder whose run finished is
skipped, so an interrupted sweep goes on where it stopped; one run at a time, all the CPU's threads.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from purer_mlops.config.loading import from_dict
from purer_mlops.errors import UserError


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``[name=]key=value[,key=value]`` → (name, {dotted key: value}); the name defaults to
    ``key-value`` joined with ``_`` (``outer_lr=0.003`` → ``outer_lr-0.003``)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    name = None
    if parts and parts[0].count("=") == 2:
        name, parts[0] = parts[0].split("=", 1)
    overrides = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: setting {text!r}: write key=value[,key=value] (e.g. outer_lr=0.003)")
        overrides[key] = yaml.safe_load(value)
    return name or "_".join(f"{k}-{v}" for k, v in overrides.items()), overrides


def with_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``params`` with dotted keys set (sections made where missing)."""
    out = yaml.safe_load(yaml.safe_dump(params))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def prepare_folder(folder: Path, project: Path, params: dict[str, Any]) -> None:
    """``folder`` with ``params`` and links to the project's data and teachers."""
    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for link, target in ((folder / "data", project / "data"), (folder / "models" / "teachers",
                                                                project / "models" / "teachers")):
        if not link.is_symlink():
            link.symlink_to(target.resolve(), target_is_directory=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="*", metavar="SETTING")
    parser.add_argument("--project", type=Path, default=Path("."), help="holds params.yaml, data/, models/teachers/")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")], default=[0, 1, 2],
                        help="comma-separated (default 0,1,2)")
    parser.add_argument("--no-default", action="store_true", help="do not sweep params.yaml as it is")
    args = parser.parse_args()
    base = yaml.safe_load((args.project / "params.yaml").read_text())
    settings = ([] if args.no_default else [("default", {})]) + [parse_setting(s) for s in args.settings]
    for name, overrides in settings:
        for seed in args.seeds:
            folder = args.out / f"{name}-s{seed}"
            if (folder / "results" / "metatrain" / "metrics.json").is_file():
                continue
            params = with_overrides(base, {**overrides, "seed": seed, "tracking": False})
            try:
                from_dict(params)  # a typo in a key or value stops the sweep before its folder is made
            except UserError as err:
                raise SystemExit(f"error: setting {name!r}: {err}") from err
            prepare_folder(folder, args.project, params)
            print(f"{folder}: purer metatrain", flush=True)
            done = subprocess.run([sys.executable, "-m", "purer_mlops", "metatrain", "--root", str(folder), "--quiet"])
            if done.returncode != 0:
                sys.exit(done.returncode)


if __name__ == "__main__":
    main()
