"""Which process runs an MLflow run, so that a run whose process was killed is closed.

A stage killed with SIGKILL (a DVC queue worker stopped, the machine's OOM killer) cannot end
its run: it would stay RUNNING in the UI for ever. Each run is tagged with its process
(host, pid and, on Linux, the process's start time, so a reused pid is not mistaken for it);
the next tracked stage in the same experiment marks the runs whose process is gone KILLED.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

TAG_PROCESS = "purer.process"  # "<host> <pid> <start time in clock ticks, or 0>"
TAG_CLOSED = "purer.closed_by"


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot) from /proc; None when it does not exist,
    0 where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def this_process() -> str:
    """The value of :data:`TAG_PROCESS` for the calling process."""
    return f"{socket.gethostname()} {os.getpid()} {_start_time(os.getpid()) or 0}"


def is_gone(process: str) -> bool:
    """Whether the process a tag names has ended (only a process of this host can be told)."""
    try:
        host, pid, started = process.split()
        pid_number, started_ticks = int(pid), int(started)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    now = _start_time(pid_number)
    if now is None:
        return True
    if started_ticks and now:
        return now != started_ticks  # the pid was reused by another process
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def close_dead_runs(client: Any, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of ``experiment_id`` whose process has ended; their ids."""
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    closed = []
    for run in runs:
        process = run.data.tags.get(TAG_PROCESS)
        if process and is_gone(process):
            client.set_tag(run.info.run_id, TAG_CLOSED, f"its process ({process}) ended without closing it")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed
