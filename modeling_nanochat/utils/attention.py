"""Which attention implementation to run on a device, and why, in one line a log or a report can carry.

nanochat runs Flash Attention 3 on Hopper through the `kernels` package (Hub-hosted prebuilt kernels); transformers
reaches the same kernel with `attn_implementation="kernels-community/flash-attn3"`. Everywhere else PyTorch's SDPA is
the fast built-in choice, so that is the fallback.
"""

import importlib.util

import torch

FLASH_ATTN3 = "kernels-community/flash-attn3"


def kernels_available() -> bool:
    """Whether the `kernels` package can be imported (checked without importing it: importing is slow)."""
    return importlib.util.find_spec("kernels") is not None


def pick_attention(device) -> tuple[str, str]:
    """(attn_implementation, reason): flash-attn3 on a Hopper GPU (capability 9.x) with `kernels` installed, else
    sdpa. The reason is one line saying which runs and why (the first unmet condition when it is sdpa).

    The kernel itself comes from the Hub (or its local cache) when the model first uses it; this only checks what
    can be checked without fetching anything."""
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa", (f"sdpa: the device is {device.type}, not CUDA — flash-attn3 needs a Hopper GPU "
                        "(capability 9.x)")
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return "sdpa", (f"sdpa: CUDA capability {major}.{minor} is not Hopper (9.x) — the flash-attn3 kernel "
                        "nanochat uses is picked for Hopper")
    if not kernels_available():
        return "sdpa", "sdpa: the kernels package is not installed (pip install kernels) — flash-attn3 needs it"
    return FLASH_ATTN3, (f"{FLASH_ATTN3}: Hopper GPU (capability {major}.{minor}) and the kernels package is "
                         "installed, as nanochat runs it")


def use_best_attention(model, device) -> tuple[str, str]:
    """Give `model` the attention `pick_attention` chooses for `device`; when that kernel cannot be loaded (not
    cached offline, no build for this torch), keep sdpa and say why. Returns (what runs, the one-line reason)."""
    name, reason = pick_attention(device)
    if name == "sdpa":
        model.set_attn_implementation("sdpa")
        return name, reason
    try:
        model.set_attn_implementation(name)
    except Exception as e:  # noqa: BLE001 - any failure to fetch or load the kernel means: fall back
        model.set_attn_implementation("sdpa")
        return "sdpa", f"sdpa: {name} could not be loaded ({type(e).__name__}: {str(e)[:160]})"
    return name, reason
