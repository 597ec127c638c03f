"""Lanes: one process's CPU threads split into parallel streams of independent work.

Much of a run is small kernels; on a CPU, two intra-op threads run each of them only about
1.5x faster than one (measured on a 2-core EPYC, docs/performance.md). Split into lanes of
fewer threads each, independent work runs side by side: the teachers being pretrained, the
teachers of a bank update, the tasks of a meta-batch, of meta-val and of meta-test. Every
random draw stays on the calling thread, before the lanes start, so the draws are those of a
single lane; only the order of the floating-point sums that join the lanes' shares (and the
thread count each kernel runs with) differs. Lane 0 is the calling thread; the others are
pool threads, each with its own autograd graph (CPU autograd runs on the thread that calls it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

import torch

from .distributed import contiguous_share

T = TypeVar("T")


class Lanes:
    """``count`` lanes of ``threads`` intra-op threads each (build with :func:`open_lanes`)."""

    def __init__(self, count: int, threads: int):
        self.count, self.threads = count, threads
        self._pool = (ThreadPoolExecutor(count - 1, thread_name_prefix="lane", initializer=torch.set_num_threads,
                                         initargs=(threads,)) if count > 1 else None)

    def shares(self, n: int) -> list[range]:
        """``n`` items (teachers, tasks) as one contiguous range per lane (empty when n < count)."""
        return [contiguous_share(n, lane, self.count) for lane in range(self.count)]

    def map(self, fn: Callable[[int, range], T], n: int) -> list[T]:
        """``fn(lane, share)`` for every lane's share of ``n`` items, side by side; results in lane order."""
        shares = self.shares(n)
        if self._pool is None:
            return [fn(0, shares[0])]
        futures = [self._pool.submit(fn, lane, share) for lane, share in enumerate(shares) if lane > 0]
        try:
            first = fn(0, shares[0])
        finally:
            wait(futures)  # no lane still runs when this returns or raises
        return [first, *(f.result() for f in futures)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


ONE = Lanes(1, 0)  # everything on the calling thread, at its thread count


def lane_count(setting: int, device: torch.device, one_lane: bool = False) -> int:
    """Lanes for the ``lanes`` knob: ``0`` (auto) gives two on a CPU with two threads or more.

    CUDA keeps one lane, and so does ``one_lane``: compiled code (Dynamo is not meant to trace
    from several threads at once) and ICFIL (its calibration runs one learner).
    """
    if device.type != "cpu" or one_lane:
        return 1
    if setting == 0:
        return 2 if torch.get_num_threads() >= 2 else 1
    return setting


@contextmanager
def open_lanes(count: int) -> Iterator[Lanes]:
    """``count`` lanes sharing this process's intra-op threads; the caller's count is restored after."""
    if count <= 1:
        yield ONE
        return
    before = torch.get_num_threads()
    lanes = Lanes(count, max(1, before // count))
    torch.set_num_threads(lanes.threads)
    try:
        yield lanes
    finally:
        lanes.close()
        torch.set_num_threads(before)
