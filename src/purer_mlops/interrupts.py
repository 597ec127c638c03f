"""Ctrl-C and SIGTERM stop a command the same way, and a training loop may finish its iteration first.

``kill``, a batch scheduler or ``docker stop`` send SIGTERM, whose default action ends the
process at once: no checkpoint, and the MLflow run stays RUNNING. :func:`treat_sigterm_as_ctrl_c`
makes it raise :class:`Interrupted` (a ``KeyboardInterrupt``) like Ctrl-C does, so every
``finally`` runs: temporaries are removed, the run is marked KILLED. :func:`held` defers both
signals to a point where the loop's state is whole and can be saved; a second signal stops at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM; ``saved`` says what was kept, for the message."""

    def __init__(self, signum: int, saved: str = ""):
        super().__init__(signum, saved)
        self.signum, self.saved = signum, saved


def _raise(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def treat_sigterm_as_ctrl_c() -> None:
    """SIGTERM raises :class:`Interrupted` in the main thread, as Ctrl-C raises KeyboardInterrupt."""
    signal.signal(signal.SIGTERM, _raise)


@dataclass
class Pending:
    """The signal received while held (None: none yet)."""

    signum: int | None = None


@contextmanager
def held(enabled: bool = True) -> Iterator[Pending]:
    """Inside, SIGINT and SIGTERM are only recorded in the yielded :class:`Pending`; the caller
    checks it where its state is consistent. A second signal raises at once. Outside the main
    thread, or with ``enabled`` false (several ranks must stop together), signals act as usual."""
    pending = Pending()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield pending
        return

    def record(signum: int, _frame: object) -> None:
        if pending.signum is not None:
            raise Interrupted(signum)
        pending.signum = signum

    previous = {s: signal.signal(s, record) for s in SIGNALS}
    try:
        yield pending
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
