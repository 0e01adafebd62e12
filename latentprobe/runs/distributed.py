"""Scale-out with torch's own launcher: under `torchrun`, each rank takes an interleaved share of instances
and writes its own store shards (the store reads the union as one run)."""

from __future__ import annotations

import os


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size from torchrun's environment (0, 1 when not distributed)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def distributed_shard(instances, writer_id: str):
    rank, world = rank_and_world()
    if world <= 1:
        return instances, writer_id
    return instances[rank::world], f"{writer_id}-rank{rank}of{world}"


def init_if_launched():
    """Join torchrun's process group (gloo on CPU, nccl on GPU) and pin this rank to its GPU, if launched."""
    import torch
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world <= 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)


def finish():
    """Wait for every rank (so the run is complete when rank 0 reports) and leave the group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    """Wait for every rank (a no-op outside torchrun's process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
