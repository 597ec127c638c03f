"""Filelists: ``<dataset root>/split/{meta_train,meta_val,meta_test}.csv`` with header ``filename,label``.

``filename`` is relative to the dataset root (``meta_train/<class>/<image>``) and ``label``
is the class folder name. Rows are sorted by class, then file name, so the same tree
always gives the same bytes (the reference listed folders unsorted).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from ..errors import UserError
from ..fileio import OutputFolder, atomic_dir
from .registry import IMAGE_SUFFIXES, SPLITS

SPLIT_FOLDER = OutputFolder("a filelist folder (meta_train.csv, meta_val.csv, meta_test.csv)",
                            r"meta_(train|val|test)\.csv|normalisation\.json")


def list_split(root: Path, split: str) -> list[tuple[str, str]]:
    """Rows ``(relative filename, class name)`` of one split folder, sorted.

    Files that are not images by their suffix (``.DS_Store``, notes) are skipped;
    an empty split or a class folder without images is a :class:`UserError`.
    """
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist: run `dvc repro prepare` (or `purer prepare`) first.")
    rows: list[tuple[str, str]] = []
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{folder} holds no class folders: the split is empty. Re-run `purer prepare`.")
    for cls in classes:
        files = sorted(p for p in cls.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"class folder {cls} holds no images (.png/.jpg): add images or remove it.")
        rows += [(f"{split}/{cls.name}/{f.name}", cls.name) for f in files]
    return rows


Extra = Callable[[list[tuple[str, str]]], dict[str, str]]  # meta_train rows -> more files (name -> text)


def write_filelists(root: Path, progress: bool = False, extra: Extra | None = None) -> dict[str, dict[str, int]]:
    """Write ``root/split/<split>.csv`` for the three splits; returns class and image counts.

    ``extra``: given the meta_train rows, more files (name → text) to write beside the filelists.
    """
    splits = tqdm(SPLITS, desc=f"filelist {root.name}", unit="split", disable=not progress)
    tables = {split: list_split(root, split) for split in splits}
    more = extra(tables["meta_train"]) if extra else {}
    with atomic_dir(root / "split", SPLIT_FOLDER) as tmp:
        for name, text in more.items():
            (tmp / name).write_text(text)
        for split, rows in tables.items():
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["filename", "label"])
            writer.writerows(rows)
            (tmp / f"{split}.csv").write_text(buf.getvalue())
    return {split: {"classes": len({c for _, c in rows}), "images": len(rows)}
            for split, rows in tables.items()}


def filelist_path(root: Path, split: str) -> Path:
    """``root/split/<split>.csv``."""
    return root / "split" / f"{split}.csv"


def read_filelist(root: Path, split: str) -> list[tuple[Path, str]]:
    """Rows ``(absolute path, class name)`` of ``root/split/<split>.csv``, checked.

    Refuses a file whose header is not ``filename,label`` and any row whose path leaves
    the dataset root (``../``, absolute paths, links out): a filelist is input, not code.
    """
    path = filelist_path(root, split)
    if not path.is_file():
        raise UserError(f"filelist {path} not found: run `dvc repro filelist` (or `purer filelist`).")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["filename", "label"]:
            raise UserError(f"{path}: header must be 'filename,label', got {','.join(header or [])!r}. "
                            "Regenerate it with `purer filelist`.")
        base = root.resolve()
        rows = []
        for n, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise UserError(f"{path}, line {n}: expected 2 columns (filename,label), got {len(row)}.")
            if not row[0].strip() or not row[1].strip():
                raise UserError(f"{path}, line {n}: the {'filename' if not row[0].strip() else 'label'} is empty; "
                                "fix or remove the row, or regenerate the file with `purer filelist`.")
            full = (root / row[0]).resolve()
            if not full.is_relative_to(base):
                raise UserError(f"{path}, line {n}: {row[0]!r} points outside the dataset root {root}; "
                                "filelist paths must stay inside it.")
            rows.append((full, row[1]))
    if not rows:
        raise UserError(f"{path} lists no images: the split is empty. Check data/ and re-run `purer filelist`.")
    return rows
