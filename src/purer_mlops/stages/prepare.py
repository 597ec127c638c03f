"""Stage ``prepare``: lay a dataset out in the seed's folder form (Glyph-FS is generated)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..data import glyphs, sources
from ..paths import Project

if TYPE_CHECKING:  # the stage reads two knobs: importing config would make it depend on all of it
    from ..config import Params


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
