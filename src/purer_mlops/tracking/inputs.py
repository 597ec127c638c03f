"""The data a stage's run reads, logged as MLflow dataset inputs carrying their DVC hashes.

A stage's inputs (the teacher pool, the dataset splits) are DVC outputs of earlier stages:
their hash is the one ``dvc.lock`` records (``md5``, ``<hash>.dir`` for a folder), else the one
a ``<path>.dvc`` file records, else computed here as DVC computes it (a file's md5; for a
folder, the md5 of the JSON list of its files' ``{"md5", "relpath"}`` sorted by path). The
run page then lists them under "Datasets", and two runs that read the same bytes show the
same digest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from ..paths import Project

CONTEXT_TAG = "mlflow.data.context"  # what the UI shows beside a dataset: training, validation, ...


def stage_inputs(project: Project, params: Any, stage: str) -> list[tuple[str, Path, str]]:
    """(name, path, context) of each input a stage's run reads."""
    data = project.dataset(params.dataset)
    teachers = ("teachers", project.teachers, "training")
    val = (f"{params.dataset}/meta_val", data / "meta_val", "validation")
    test = (f"{params.dataset}/meta_test", data / "meta_test", "evaluation")
    return {"metatrain": [teachers, val], "metatest": [test], "compare": [teachers, val, test]}.get(stage, [])


def _md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - DVC's content hash, not a security measure
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_md5(path: Path) -> str:
    """The hash DVC gives ``path``: a file's md5, or ``<md5 of the file list>.dir`` for a folder."""
    if path.is_file():
        return _md5(path)
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    listing = [{"md5": _md5(p), "relpath": rel} for rel, p in files]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"  # noqa: S324


def recorded_md5(project: Project, path: Path) -> str | None:
    """The hash ``dvc.lock`` (any stage's outs) or ``<path>.dvc`` records for ``path``."""
    rel = path.relative_to(project.root).as_posix()
    sources = [(project.dvc_lock, lambda d: [o for s in (d.get("stages") or {}).values() for o in s.get("outs", [])]),
               (path.with_name(path.name + ".dvc"), lambda d: d.get("outs", []))]
    for file, outs_of in sources:
        try:
            outs = outs_of(yaml.safe_load(file.read_text()) or {})
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        for out in outs:
            if isinstance(out, dict) and out.get("path") in (rel, path.name) and out.get("md5"):
                return str(out["md5"])
    return None


def log_inputs(client: Any, run_id: str, project: Project, params: Any, stage: str) -> None:
    """Log the stage's inputs that exist as the run's dataset inputs."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for name, path, context in stage_inputs(project, params, stage):
        if not path.exists():
            continue
        recorded = recorded_md5(project, path)
        md5 = recorded or dvc_md5(path)
        rel = path.relative_to(project.root).as_posix()
        profile = {"dvc_md5": md5, "hash_from": "dvc.lock or .dvc" if recorded else "computed like DVC"}
        dataset = Dataset(name=name, digest=md5, source_type="local", source=json.dumps({"uri": rel}),
                          profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, context)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
