"""(rank, world size) of this process: torch.distributed's when a process group is up, else (0, 1).

The one place the library, the training loop and the evaluators ask. Accelerate's own counters are not used: under
DeepSpeed or torchrun on CPU they can report a single process (HF_NOTES §7)."""

import os

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size() -> int:
    """The number of processes, also before the process group exists: launchers (torchrun, accelerate launch,
    deepspeed) set WORLD_SIZE for every process they start."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
