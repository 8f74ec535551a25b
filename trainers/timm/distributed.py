"""One process per device under `torchrun`: the process group, its device, and the collectives
the trainer needs (local-rank-0-first staging, sums across ranks, a stop flag from rank 0).

Single-process runs get the same object with every collective a no-op, so the training code has
no `if distributed:` branches. torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; the process group reads them (init method `env://`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import Sampler

import utils

log = logging.getLogger(f"trainer.{__name__}")
T = TypeVar("T")

# A rank may wait this long for its peers (e.g. while rank 0 evaluates best.pt at the end).
COLLECTIVE_TIMEOUT = dt.timedelta(minutes=30)


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    # Started by torchrun: a process group even for one process, so `torchrun --nproc_per_node 1`
    # runs the multi-GPU path (DDP, collectives, NCCL on CUDA) on a one-GPU machine.
    launched: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_first(self, fn: Callable[[], T], *, share: bool = False) -> T:
        """Run `fn` on each node's local rank 0 first, then on the node's other ranks.

        With `share=True` the other ranks take local rank 0's result (a path in the node's work
        dir) instead of calling `fn`: downloads happen once per node. A TrainerError on any local
        rank 0 is raised on every rank, so all ranks fail the same way instead of waiting for a
        peer that is gone. Relies on torchrun's layout: a node's ranks are contiguous, so its
        local rank 0 is global rank `rank - local_rank`.
        """
        if not self.enabled:
            return fn()
        value, failure = None, None
        if self.local_rank == 0:
            try:
                value = fn()
            except utils.TrainerError as exc:
                failure = exc
        gathered: list = [None] * self.world_size
        torch_dist.all_gather_object(gathered, (value if share else None, failure))
        for _, exc in gathered:
            if exc is not None:
                raise exc
        if self.local_rank == 0:
            return value
        return gathered[self.rank - self.local_rank][0] if share else fn()

    def sum(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """Element-wise sum across ranks (float64: integer counts stay exact below 2**53)."""
        array = np.asarray(values, dtype=np.float64)
        if not self.enabled:
            return array
        tensor = torch.from_numpy(array.copy()).to(self.device)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor.cpu().numpy()

    def from_main(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (e.g. "the platform asked us to stop")."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank.

        DDP syncs buffers at the start of each forward, and each rank's last forward then moves
        its own copy: without this, the ranks would validate slightly different models, and
        not the one rank 0 saves.
        """
        if self.enabled:
            for buffer in module.buffers():
                torch_dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                torch_dist.barrier(device_ids=[self.device.index or 0])
            else:
                torch_dist.barrier()


def resolve_device(setting: str | None, local_rank: int = 0, distributed: bool = False,
                   ) -> torch.device:
    """DEVICE: auto, cpu, cuda, cuda:N, N, or a list N,M. Under torchrun each process takes the
    GPU of its local rank (from the list when one is given)."""
    wanted = (setting or "auto").strip().lower()
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise utils.ConfigError(f"DEVICE={setting!r} asks for a GPU but CUDA is not available")
    if wanted in ("auto", "cuda"):
        return torch.device("cuda", local_rank if distributed else 0)
    ids = [part.strip().removeprefix("cuda:") for part in wanted.split(",") if part.strip()]
    try:
        indices = [int(i) for i in ids]
    except ValueError:
        raise utils.ConfigError(f"DEVICE={setting!r} is not auto, cpu, cuda, cuda:N or a list "
                                "of GPU indices") from None
    if distributed:
        if local_rank >= len(indices):
            raise utils.ConfigError(f"DEVICE={setting!r} names {len(indices)} GPU(s) but this "
                                    f"is local rank {local_rank}")
        return torch.device("cuda", indices[local_rank])
    if len(indices) > 1:
        log.warning("DEVICE=%s: one process uses one GPU (cuda:%d); run it under "
                    "`torchrun --nproc_per_node=%d` to train on all of them", setting, indices[0],
                    len(indices))
    return torch.device("cuda", indices[0])


@contextlib.contextmanager
def distributed(job: utils.Job, device_setting: str | None) -> Iterator[Dist]:
    """The process group for this job's ranks (none for a single process); torn down at exit.

    Every rank meets at a barrier before the group is destroyed: a rank that tears down while a
    peer is still in its last collective makes that peer abort.
    """
    # torchrun's own variables (RANK & co. are read by utils.Job)
    launched = utils.outside_env("TORCHELASTIC_RUN_ID") is not None
    local_world_size = int(utils.outside_env("LOCAL_WORLD_SIZE") or 1)
    enabled = job.world_size > 1 or launched
    device = resolve_device(device_setting, job.local_rank, enabled)
    if not enabled:
        yield Dist(device=device)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch_dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    log.info("rank %d/%d (local %d) on %s, backend %s", job.rank, job.world_size,
             job.local_rank, device, backend)
    finished = False
    try:
        yield Dist(job.rank, job.local_rank, job.world_size, local_world_size, device, launched)
        finished = True
    finally:
        if finished:
            Dist(job.rank, job.local_rank, job.world_size, local_world_size, device,
                 launched).barrier()
        torch_dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index from `rank`, without padding.

    DistributedSampler repeats samples to give every rank the same count; summed across ranks,
    those repeats would count some validation images twice. Here each image is seen by exactly
    one rank, so the reduced confusion matrix equals a single process's.
    """

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
