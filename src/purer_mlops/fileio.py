"""Atomic writes: an output is either the old file or the complete new one, never half-written.

A folder is replaced as a whole only when it is missing, empty or holds nothing but what the
command writes there (:class:`OutputFolder`), and never when it contains one of the command's
inputs. Temporaries that a killed writer left (``kill -9`` allows no clean-up) are removed by
the next write of the same path.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

# ".<name>.<pid>-<12 hex>.tmp"; versions before the pid was added wrote ".<name>.<12 hex>.tmp"
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[0-9a-f]{12}\.tmp")


@dataclass(frozen=True)
class OutputFolder:
    """A kind of folder a command replaces as a whole.

    Attributes:
        what: what the folder is, for messages ("a teacher pool (pool.json, teacher_*.safetensors)").
        names: a regular expression every entry of such a folder fully matches.
    """

    what: str
    names: str

    def foreign(self, folder: Path) -> list[str]:
        """The entries of ``folder`` that the command did not write (temporaries aside)."""
        return sorted(e.name for e in os.scandir(folder)
                      if not re.fullmatch(self.names, e.name) and not _TEMPORARY.fullmatch(e.name))


def check_replaceable(path: str | os.PathLike, kind: OutputFolder, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse to replace ``path`` when it contains (or is) one of ``inputs``, or when it holds
    anything but ``kind``'s entries: the command would delete what it did not write."""
    path = Path(path)
    target = path.resolve()
    for item in inputs:
        if Path(item).resolve().is_relative_to(target):
            raise UserError(f"the output folder {path} contains the input {item}: writing there would delete it. "
                            "Choose another output folder.")
    if path.exists() and not path.is_dir():
        raise UserError(f"the output folder {path} is a file: move it away or choose another output folder.")
    foreign = kind.foreign(path) if path.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"the output folder {path} is not {kind.what}: it holds {shown}, which this command "
                        "did not write and would delete. Choose an empty or new folder, or move them away.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` whose writer is gone (killed before it could clean up)."""
    if not path.parent.is_dir():
        return
    for entry in os.scandir(path.parent):
        found = _TEMPORARY.fullmatch(entry.name)
        if found is None or found["name"] != path.name or (found["pid"] and _alive(int(found["pid"]))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)


def _create_beside(path: Path, create: Callable[[Path], None]) -> Path:
    """A fresh hidden sibling ``.<name>.<pid>-<random>.tmp`` of ``path``, made by ``create``."""
    remove_stale_temporaries(path)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")
        try:
            create(tmp)
            return tmp
        except FileExistsError:
            continue


def _new_file(path: Path) -> None:
    # 0o666 & ~umask, applied by the kernel (mkstemp would make it 0600)
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


def _new_sibling(path: Path, create: Callable[[Path], None]) -> Path:
    """``path``'s folder (made if missing) and a fresh temporary beside ``path``; a read-only
    folder, or a file where a folder should be, is a :class:`UserError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _create_beside(path, create)
    except OSError as err:
        raise UserError(f"could not write {path}: {err.strerror or err}. Check the folder's permissions, or "
                        "write elsewhere; nothing was changed.") from err


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary file is removed and ``path`` is left as it was.
    A write that fails for lack of space (or any OS error) becomes a :class:`UserError`.
    """
    path = Path(path)
    tmp_path = _new_sibling(path, _new_file)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise UserError(
            f"could not write {path}: {err.strerror or err}. Free some disk space or check "
            "the folder's permissions; the previous file (if any) is intact."
        ) from err
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document at ``path``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | os.PathLike, columns: dict[str, list[float]]) -> None:
    """Write equal-length columns as a CSV with a header row (6 significant digits), atomically."""
    lines = [",".join(columns)] + [",".join(f"{v:.6g}" for v in row) for row in zip(*columns.values(), strict=True)]
    write_text(path, "\n".join(lines) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike, kind: OutputFolder, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it in place of ``path`` on success.

    ``path`` is first checked (:func:`check_replaceable`): it must be missing, empty or of
    ``kind``, and contain none of ``inputs``. A failure leaves the previous folder (if any)
    untouched and removes the partial one.
    """
    path = Path(path)
    check_replaceable(path, kind, inputs)
    tmp = _new_sibling(path, lambda p: os.mkdir(p, 0o777))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"could not write {path}: {err.strerror or err}. Free some disk space or check "
            "the folder's permissions; the previous outputs are intact."
        ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
