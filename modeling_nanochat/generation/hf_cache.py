"""The KV cache under the name each model and transformers version uses, for code that drives any causal LM.

transformers 5.25 renamed the cache argument and output field from ``past_key_values`` to ``cache`` (the old names
warn, and are removed in 5.40); models loaded on older versions, or written as remote code for them, only know
``past_key_values``. Loops that feed a cache back by hand (the tool-use engine) ask here instead of naming either.
Our own model accepts both names (``modeling_nanochat.py`` speaks to transformers itself).
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def _forward_takes_cache(forward_type) -> bool:
    return "cache" in inspect.signature(forward_type).parameters


def cache_kwargs(model, cache) -> dict:
    """``{"cache": cache}`` for a forward that declares ``cache`` (transformers >= 5.25, and ours), else
    ``{"past_key_values": cache}``."""
    forward = getattr(type(model), "forward", None) or model.forward
    return {"cache" if _forward_takes_cache(forward) else "past_key_values": cache}


def output_cache(outputs):
    """The cache a forward returned, read from ``cache`` (>= 5.25) or ``past_key_values`` without a warning."""
    fields = getattr(outputs, "__dataclass_fields__", {})
    return getattr(outputs, "cache" if "cache" in fields else "past_key_values", None)


def prefill(model, prompt: list[int], cache=None):
    """One forward of a batch-1 prompt (token ids) at positions 0..T-1 into ``cache`` (None: the model makes its
    own), keeping only the last position's logits (the full (T, V) logits cost as much as a layer). Returns
    (logits (1, V), the filled cache)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out = model(input_ids=ids, position_ids=torch.arange(len(prompt), device=device)[None], use_cache=True,
                logits_to_keep=1, return_dict=False, **cache_kwargs(model, cache))
    logits, cache = tuple_logits_cache(out)
    return logits[:, -1, :], cache


def tuple_logits_cache(outputs):
    """(logits, cache) of a ``return_dict=False`` forward with ``use_cache=True`` and no labels: transformers' tuple
    keeps the output's fields in order without the None ones, so these come first. Loops that run a forward per
    token ask for the tuple: building the output object costs a small model ~2% of its step."""
    return outputs[0], outputs[1]
