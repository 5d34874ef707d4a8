"""The `--dtype` names every CLI accepts, and the default: bfloat16 on CUDA, float32 elsewhere (bf16 matmuls are
~400x slower on CPU, CPU_AND_INSTALL_NOTES)."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | None, device) -> torch.dtype:
    """The torch dtype for a `--dtype` name; None (or an unknown name) gives the device's default."""
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return DTYPES.get(name, torch.bfloat16 if device_type == "cuda" else torch.float32)
