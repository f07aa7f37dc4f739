"""Data-parallel calibration over ``torch.distributed`` ranks (launch with ``torchrun``).

Each rank holds a share of the calibration windows and pushes only those through the blocks.
The statistics a layer-wise solver needs are sums over tokens, so they are all-reduced and
every rank holds the same problems. The solves are then shared: :func:`balanced_owners` gives
each one (a group of layers, a weight step) to one rank, deterministically and the same on every
rank, and the owner broadcasts its answer, so each problem is solved once and the ranks hold
bit-identical models whatever their kernels' float ordering. Without an initialised process
group (or with one rank) every function here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparsellm.errors import UserError

__all__ = [
    "Ranks",
    "all_reduce_sum_",
    "balanced_owners",
    "broadcast_",
    "init_from_environment",
    "is_main",
    "ranks",
    "shard",
    "shared_run",
    "world",
]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that reports and writes."""
    return world()[0] == 0


def shard(windows: torch.Tensor, run: int = 1) -> torch.Tensor:
    """This rank's share of ``windows`` [n, seqlen]: every ``world_size``-th run of ``run``
    consecutive windows, from its rank's. With the engine's batch size as ``run`` every batch
    is one rank's, whole, so statistics summed batch by batch (order-independent sums,
    ``statistics.py``) equal one process's bit for bit."""
    rank, size = world()
    if size == 1:
        return windows
    if windows.shape[0] < size:
        raise UserError(
            f"{windows.shape[0]} windows cannot be shared by {size} processes: "
            "each needs at least one"
        )
    starts = range(rank * run, windows.shape[0], size * run)
    return torch.cat([windows[start : start + run] for start in starts])


def shared_run(windows: int, batch_size: int) -> int:
    """Windows per run (and per batch) when ranks share ``windows``: ``batch_size``, fewer if
    there would otherwise be fewer runs than ranks (a rank without windows has no work). One
    process with this batch size computes the same statistics as the ranks."""
    size = world()[1]
    return batch_size if size == 1 else max(1, min(batch_size, windows // size))


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with rank ``src``'s, in place."""
    if world()[1] > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def balanced_owners(costs: Sequence[float], size: int) -> list[int]:
    """The rank that solves each of the problems whose costs are ``costs``.

    Greedy longest-processing-time: problems in decreasing cost (ties: lower index first) each
    go to the least loaded rank (ties: lower rank). Only costs and ``size`` enter, so every rank
    computes the same assignment without talking to the others.
    """
    loads = [0.0] * size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks that share the solves, as a pure solver sees it:
    who solves what (:meth:`owners`) and how the owner's answer reaches the others."""

    rank: int
    size: int

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The owner rank of each problem (:func:`balanced_owners`)."""
        return balanced_owners(costs, self.size)

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Overwrite ``tensor`` with rank ``src``'s, in place."""
        return broadcast_(tensor, src)


def ranks() -> Ranks | None:
    """The :class:`Ranks` of this process, or None in a single process (nothing to share)."""
    rank, size = world()
    return Ranks(rank, size) if size > 1 else None


def init_from_environment(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1) and return this
    rank's device (``cuda:LOCAL_RANK`` for CUDA); a no-op in a single process.

    Backend: NCCL for CUDA devices, gloo otherwise. The timeout is generous because rank 0
    may be busy (loading, saving) while the others wait at a collective.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return device
