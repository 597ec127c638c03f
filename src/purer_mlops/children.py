"""Worker processes die with the process that started them.

A pool's workers outlive a parent killed with SIGKILL (no ``finally`` runs, no shutdown is
sent) and would go on writing into folders the next run removes. On Linux a worker asks the
kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``); elsewhere nothing is done.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Call first thing in a worker (a pool's ``initializer``): SIGKILL it when ``parent`` (the
    pid that started it) ends; if it ended already, end now."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the request: no signal will come
        os._exit(1)
