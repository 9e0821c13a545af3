"""Process-group plumbing for ``torchrun``: join the group, pick the device, sum over ranks.

Everything here is a no-op in a single process, so the trainer and the evaluation call it
unconditionally. :func:`unwrap` is the one place that looks through a DDP wrapper.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class DistInfo:
    """This process's place in the group (``enabled`` False: a single process)."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def setup_distributed(backend: Optional[str], device_hint: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (if any).

    ``backend`` None picks nccl for CUDA, gloo for CPU. The group is created once per process
    and torn down at exit, not after each ``train()``: under torchrun a second
    ``init_process_group`` on the launcher's store can meet the first group's stale rendezvous
    keys and hang, so later calls (e.g. a resume in the same process) reuse the group.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_world_size() > 1, dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    backend = backend or ("nccl" if device_hint == "cuda" else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    atexit.register(_destroy_group)
    return DistInfo(True, rank, world, local_rank)


def resolve_device(name: str, dist_info: DistInfo) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; a bare ``"cuda"`` -> this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", dist_info.local_rank if dist_info.enabled else torch.cuda.current_device())
    return dev


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every rank, in place (unchanged in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def gather_objects(obj, dist_info: DistInfo) -> List:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not dist_info.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * dist_info.world_size
    dist.all_gather_object(out, obj)
    return out
