"""(rank, world size) of this process: torch.distributed's when a process group is up, else (0, 1).

The one place the library, the training loop and the evaluators ask. Accelerate's own counters are not used: under
DeepSpeed or torchrun on CPU they can report a single process (HF_NOTES §7)."""

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
