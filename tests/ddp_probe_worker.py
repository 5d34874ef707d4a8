"""Started by tests/recipes/test_accelerate_configs.py under `accelerate launch`: prints what Accelerate and
torch.distributed see, and whether DDP synced a gradient computed from rank-dependent data."""

import json
import sys
import os

import torch
import torch.distributed as dist
from accelerate import Accelerator

acc = Accelerator()
model = acc.prepare(torch.nn.Linear(4, 1, bias=False))
rank = dist.get_rank() if dist.is_initialized() else 0  # not acc.process_index: it says 0 on both when unsynced
x = torch.full((2, 4), float(rank + 1))
acc.backward(model(x).sum())
grad = model.module.weight.grad if hasattr(model, "module") else model.weight.grad
grads = [torch.zeros_like(grad) for _ in range(dist.get_world_size())] if dist.is_initialized() else [grad]
if dist.is_initialized():
    dist.all_gather(grads, grad)
print("PROBE " + json.dumps(dict(distributed_type=str(acc.distributed_type), num_processes=acc.num_processes,
                                 world_size=dist.get_world_size() if dist.is_initialized() else 1,
                                 backend=dist.get_backend() if dist.is_initialized() else None,
                                 grads_equal=all(torch.equal(g, grads[0]) for g in grads))), flush=True)
if dist.is_initialized():  # a clean gloo teardown: without it a rank can abort at exit ("terminate called ...")
    dist.barrier()
    dist.destroy_process_group()
# gloo's threads can still abort in their destructors at interpreter exit (seen on 2 cores): the probe is done
sys.stdout.flush()
os._exit(0)
