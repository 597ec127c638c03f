"""Several processes (``torchrun``): who does which share, and the sums that join the shares.

Launched by ``torchrun --nproc_per_node=N -m purer_mlops <stage>``, every rank runs the same
loop with the same seeds, so every random draw (tasks, jitter, candidate teachers) is the same
on every rank; each rank computes only its share of the work (teachers of the bank update,
tasks of the meta-batch, teachers to pretrain) and the gradients are summed with
``all_reduce``. The mathematics is the one of a single process; only rank 0 writes files and
logs. Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def pick_device(name: str) -> torch.device:
    """``auto`` → CUDA when present (this rank's GPU under torchrun), else CPU."""
    from .errors import UserError

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'.")
    if name != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def contiguous_share(n: int, part: int, parts: int) -> range:
    """Part ``part`` of ``n`` items cut into ``parts`` contiguous ranges, the first ones one longer."""
    per, extra = divmod(n, parts)
    start = part * per + min(part, extra)
    return range(start, start + per + (part < extra))


@dataclass(frozen=True)
class Ranks:
    """This process's rank among ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, n: int) -> range:
        """The contiguous slice of ``n`` items (tasks, teachers) this rank computes."""
        return contiguous_share(n, self.rank, self.world)

    def sum_(self, *tensors: torch.Tensor) -> None:
        """In-place sum over ranks (no-op for one process)."""
        if self.active:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def gather(self, obj: object) -> list:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects, CPU tensors)."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


SINGLE = Ranks()  # the one process of a run without torchrun


def setup() -> Ranks:
    """Join the process group that ``torchrun`` describes (NCCL with CUDA, else gloo)."""
    if "WORLD_SIZE" not in os.environ:  # not launched by torchrun
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Ranks(dist.get_rank(), dist.get_world_size())


def teardown(ranks: Ranks) -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
