"""Compiled decoding: a preallocated (static) KV cache and a `torch.compile`d decode step, behind one switch.

The tool-use loop (chat CLI, app, ChatCORE, GRPO rollouts: `generation.tool_use.generate`) normally decodes eagerly
with a growing cache. With the switch on it prefills the prompt once into a static cache, copies it to the batch's
rows, and runs every later step through one compiled forward whose shapes never change (batch B, cache length L),
so the Python of ~40 module calls per token collapses into one generated kernel sequence. The attention masks are
built inside that compiled step (position ids are tensors; no shape depends on how far decoding is), unlike
`generate()`, which builds them outside each step.

The switch: `compile=True/False` where a caller offers it (`--compile` in the chat CLI and ChatCORE), else the
environment variable NANOCHAT_COMPILE=1. Off by default: compiling costs ~10-15 s per new (batch, length) shape on
a 2-core CPU (less with inductor's on-disk cache warm), which short chats never earn back (README, *Speed*).

Any transformers causal LM whose class sets `_can_compile_fullgraph` can use it; ours brings `NanoChatStaticCache`
(the smear state in a fixed buffer), others get transformers' `StaticCache`.
"""

from __future__ import annotations

import importlib
import os
import threading
import weakref

import torch

from modeling_nanochat.generation.hf_cache import cache_kwargs, prefill

ENV = "NANOCHAT_COMPILE"
MIN_CACHE_LEN = 256  # cache lengths are rounded up to powers of two from here: a few shapes, a few compiles

_compiled = weakref.WeakKeyDictionary()  # model -> its compiled forward (one per model, recompiled per shape)
# One compiled step at a time in a process: the app serves several chats from threads, and dynamo's stance (guard
# skipping below) and its caches are process-wide: another loop's first step under that stance fails ("Recompilation
# triggered with skip_guard_eval_unsafe stance"; tests/generation/test_static_decode.py forces that race). A CPU step
# uses every core anyway.
_STEP_LOCK = threading.Lock()


def compile_enabled(flag: bool | None = None) -> bool:
    """The switch: an explicit `flag` wins, else NANOCHAT_COMPILE (1/true/yes/on)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


COMPILE_HELP = ("decode through a static KV cache and a torch.compile'd step (sets NANOCHAT_COMPILE=1): same tokens, "
                "faster per token once compiled; compiling takes ~10 s per batch shape on a CPU")


def enable(flag: bool = True) -> None:
    """Turn the switch on (or off) for this process and the processes it starts: what `--compile` does."""
    os.environ[ENV] = "1" if flag else "0"


def can_compile(model) -> bool:
    """Whether `model` declares that its forward compiles as one graph with a static cache."""
    return bool(getattr(model, "_can_compile_fullgraph", False) and getattr(model, "_supports_static_cache", False))


def cache_length(needed: int) -> int:
    """`needed` rounded up to a power of two, at least MIN_CACHE_LEN (rotary models have no hard position limit:
    like the eager path, decoding may run past max_position_embeddings, under the long window's mask)."""
    length = MIN_CACHE_LEN
    while length < needed:
        length *= 2
    return length


def static_cache(model, batch_size: int, max_cache_len: int):
    """The model's own static cache class when its module defines one (ours: NanoChatStaticCache), else
    transformers' StaticCache. (`max_batch_size`: transformers 4.x's StaticCache needs it; 5.x takes the batch from
    the first update and ignores it.)"""
    from transformers.cache_utils import StaticCache

    cls = getattr(importlib.import_module(type(model).__module__), "NanoChatStaticCache", StaticCache)
    return cls(config=model.config, max_cache_len=max_cache_len, max_batch_size=batch_size)


def compiled_forward(model):
    """One compiled forward per model. `dynamic=False`: every shape is specialised (the fastest code), and the
    shapes are few (batch sizes x power-of-two cache lengths)."""
    step = _compiled.get(model)
    if step is None:
        step = _compiled[model] = torch.compile(model.forward, dynamic=False, options={"cpp_wrapper": True})
    return step


def compile_generate(model):
    """Make `model.generate()` decode through a static cache and a compiled step on any device: transformers
    compiles the decode step by itself only on accelerators (and asks for a compile config elsewhere). Returns the
    model. The masks are still built outside the step by generate() (padding may differ per row)."""
    from transformers.generation import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")  # CUDA graphs ("reduce-overhead") need
    config._compile_all_devices = True  # a GPU; the private flag is transformers' own opt-in for every device
    model.generation_config.compile_config = config
    model.generation_config.cache_implementation = "static"
    return model


def _replicate(single, batch: int, into):
    """Copy a batch-1 cache's filled positions into the B-row cache `into` through the public `update` (adapter:
    reads `layers[i].keys/values` and `get_seq_length`, as every transformers 5 static layer has them)."""
    n = int(single.get_seq_length())
    for i, layer in enumerate(single.layers):
        keys, values = layer.keys[:, :, :n], layer.values[:, :, :n]
        into.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), i)
    state = getattr(single, "smear_state", None)
    if state is not None:
        into.push_smear(state.expand(batch, -1, -1))
    return into


class StaticDecoder:
    """Prefill once, then `step(ids (B, 1), position)` -> logits (B, V) through the compiled forward."""

    def __init__(self, model, prompt: list[int], batch_size: int, max_new_tokens: int):
        length = cache_length(len(prompt) + max_new_tokens)
        self.batch = batch_size
        (self.name,) = cache_kwargs(model, None)  # the forward's name for the cache
        logits, single = prefill(model, prompt, static_cache(model, 1, length))
        self.first_logits = logits.expand(batch_size, -1)
        self.cache = single if batch_size == 1 else _replicate(single, batch_size, static_cache(model, batch_size,
                                                                                               length))
        self.capacity, self.checked = length, False
        self.forward = compiled_forward(model)

    def step(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        if position >= self.capacity:
            raise ValueError(f"position {position} is past the static cache's {self.capacity} slots")
        pos = torch.full((self.batch, 1), position, dtype=torch.long, device=ids.device)
        kwargs = dict(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **{self.name: self.cache})
        with _STEP_LOCK:
            if not self.checked:  # the first step of this loop checks every guard (and compiles a new shape)
                self.checked = True
                return self.forward(**kwargs).logits[:, -1, :]
            # Later steps differ from the first only in tensor values (same model, cache, shapes, dtypes), so
            # dynamo's guard checks, ~0.2 ms a step on a CPU (~10% of a small model's step), are skipped
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.forward(**kwargs).logits[:, -1, :]
