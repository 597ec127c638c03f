"""Stage ``filelist``: the sorted filelists of a laid-out dataset, and their class/image counts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..data.filelist import write_filelists
from ..data.normalisation import normalisation_record
from ..data.registry import FOLDER, NORMALISATION_FILE
from ..fileio import write_json
from ..paths import Project

if TYPE_CHECKING:  # the stage reads a few knobs: importing config would make it depend on all of it
    from ..config import Params


def filelist(params: Params, project: Project, dataset: str | None = None, progress: bool = False) -> dict:
    """Write ``data/<dataset>/split/{meta_train,meta_val,meta_test}.csv`` (for ``folder`` also
    ``normalisation.json``) and a summary JSON."""
    name = dataset or params.dataset
    root = project.dataset(name)
    extra = None
    if name == FOLDER:  # its declared size and normalisation, computed where not given, go with the data

        def extra(rows: list[tuple[str, str]]) -> dict[str, str]:
            f = params.folder
            return {NORMALISATION_FILE: normalisation_record(root, rows, f.image_size, f.mean, f.std)}

    counts = write_filelists(root, progress, extra)
    write_json(project.results("data") / f"{name}.json", counts)
    return counts
