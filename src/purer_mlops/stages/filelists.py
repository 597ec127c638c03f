"""Stage ``filelist``: the sorted filelists of a laid-out dataset, and their class/image counts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..data.filelist import write_filelists
from ..fileio import write_json
from ..paths import Project

if TYPE_CHECKING:  # the stage reads one knob: importing config would make it depend on all of it
    from ..config import Params


def filelist(params: Params, project: Project, dataset: str | None = None, progress: bool = False) -> dict:
    """Write ``data/<dataset>/split/{meta_train,meta_val,meta_test}.csv`` and a summary JSON."""
    name = dataset or params.dataset
    counts = write_filelists(project.dataset(name), progress)
    write_json(project.results("data") / f"{name}.json", counts)
    return counts
