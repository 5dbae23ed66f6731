"""torch.distributed for `sdepure certify` under torchrun: one shard of the images per process.

torchrun (or `python -m torch.distributed.run`, also what SLURM jobs start on each node) sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Process RANK certifies shard
RANK/WORLD_SIZE on cuda:LOCAL_RANK (or the CPU). Certification needs no communication between
processes: they agree on the output directory (rank 0 broadcasts it) and meet at one barrier
before rank 0 merges the shards.

Backend: gloo, on the CPU and on CUDA alike. Only that name and a barrier cross processes, both
host-side; NCCL would add nothing but a GPU communicator, its watchdog during the hours one rank
may wait for the slowest, and a code path that cannot be tested without GPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import SdepureError

BACKEND = "gloo"
# a rank that finishes early waits at the final barrier for the slowest; at paper scale
# (minutes to an hour per image) that can be hours, so the barrier must not time out first
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process: shard the images and merge at the end."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def prefix(self) -> str:
        """Log prefix naming the process (empty for a single process)."""
        return f"[rank {self.rank}/{self.world_size}] " if self.active else ""


def _int(environ, key: str, default: int) -> int:
    value = environ.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SdepureError(f"environment variable {key} must be an integer, got {value!r}") from None


def from_environ(environ=None) -> DistEnv:
    """The process's place in a torchrun job (a single process when WORLD_SIZE is unset)."""
    environ = os.environ if environ is None else environ
    world = _int(environ, "WORLD_SIZE", 1)
    rank = _int(environ, "RANK", 0)
    local = _int(environ, "LOCAL_RANK", rank)
    if world < 1:
        raise SdepureError(f"WORLD_SIZE must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise SdepureError(f"RANK must be in 0..{world - 1} (WORLD_SIZE={world}), got {rank}")
    if local < 0:
        raise SdepureError(f"LOCAL_RANK must be >= 0, got {local}")
    if world > 1 and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
        raise SdepureError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set; start the processes "
                           "with torchrun (or python -m torch.distributed.run)")
    return DistEnv(rank, world, local)


def device_for(env: DistEnv, device: torch.device) -> torch.device:
    """cuda:LOCAL_RANK for `--device cuda` under torchrun; anything else unchanged."""
    if not env.active or device.type != "cuda":
        return device
    if device.index is not None:
        raise SdepureError(f"under torchrun give --device cuda (process LOCAL_RANK uses cuda:LOCAL_RANK), "
                           f"not {device}")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise SdepureError(f"LOCAL_RANK={env.local_rank} but this node has {count} CUDA device(s); "
                           f"start at most {count} processes per node")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def init(env: DistEnv) -> None:
    """Join the process group (MASTER_ADDR/MASTER_PORT from torchrun's environment)."""
    import torch.distributed as dist

    if env.active and not dist.is_initialized():
        dist.init_process_group(BACKEND, rank=env.rank, world_size=env.world_size, timeout=BARRIER_TIMEOUT)


def broadcast(env: DistEnv, obj):
    """Rank 0's `obj` on every rank (a picklable value)."""
    if not env.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.active:
        import torch.distributed as dist

        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
