"""The two data stages: ``prepare`` (lay the dataset out) and ``filelist`` (write its CSVs)."""

from __future__ import annotations

from ..config import Params
from ..data import glyphs, sources
from ..data.filelist import write_filelists
from ..fileio import write_json
from ..paths import Project


def prepare(params: Params, project: Project, dataset: str | None = None, progress: bool = True) -> dict:
    """Generate Glyph-FS, or lay out a real dataset from ``data/raw/``, into ``data/<dataset>/``."""
    name = dataset or params.dataset
    out = project.dataset(name)
    if name == "glyphs":
        summary = glyphs.generate(out, seed=params.glyphs.seed,
                                  images_per_class=params.glyphs.images_per_class, progress=progress)
    else:
        summary = sources.prepare(name, project.raw, out, progress=progress)
    return summary


def filelist(params: Params, project: Project, dataset: str | None = None, progress: bool = False) -> dict:
    """Write ``data/<dataset>/split/{meta_train,meta_val,meta_test}.csv`` and a summary JSON."""
    name = dataset or params.dataset
    counts = write_filelists(project.dataset(name), progress)
    write_json(project.results("data") / f"{name}.json", counts)
    return counts
