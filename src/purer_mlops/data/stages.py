"""The two data stages: ``prepare`` (lay the dataset out) and ``filelist`` (write its CSVs)."""

from __future__ import annotations

from pathlib import Path

from ..config import Params
from ..fileio import write_json
from . import glyphs, sources
from .filelist import write_filelists


def prepare(params: Params, root: Path, dataset: str | None = None, progress: bool = True) -> dict:
    """Generate Glyph-FS, or lay out a real dataset from ``data/raw/``, into ``data/<dataset>/``."""
    name = dataset or params.dataset
    out = root / "data" / name
    if name == "glyphs":
        summary = glyphs.generate(out, seed=params.glyphs.seed,
                                  images_per_class=params.glyphs.images_per_class, progress=progress)
    else:
        summary = sources.prepare(name, root / "data" / "raw", out, progress=progress)
    return summary


def filelist(params: Params, root: Path, dataset: str | None = None) -> dict:
    """Write ``data/<dataset>/split/{meta_train,meta_val,meta_test}.csv`` and a summary JSON."""
    name = dataset or params.dataset
    counts = write_filelists(root / "data" / name)
    write_json(root / "results" / "data" / f"{name}.json", counts)
    return counts
