"""What a compressed variant costs and keeps: size, memory, speed and quality, each measured the same way for
every variant so that the lab's table compares like with like.

A variant is a model dir, optionally quantized at load time (`method`: for backends whose quantized weights
transformers cannot save, e.g. optimum-quanto). Evaluation is passed in as data paths, not chosen here:

* size: parameters (of the architecture, so a quantized variant counts the same parameters in fewer bits) and bytes
  of the weight files on disk;
* memory: the peak resident memory of loading the variant and decoding one batch, measured in a fresh process
  (`peak_memory`, run as `python -m modeling_nanochat.compression.measure`), over that process's own baseline; on
  CUDA the peak of allocated memory;
* speed: prefill and greedy-decode tokens per second at batch 1 and 8 (`speed_round`: one timing per call, so the
  caller interleaves variants and takes medians);
* quality: val bits per byte, CORE (the synthetic bundle offline), and the chat tasks' accuracy.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class Variant:
    name: str
    model_dir: str
    method: str | None = None  # quantize at load time with this method (see compression/quantize.py)
    kind: str = "fp32"  # what the row is: fp32, quantized, distilled, scratch, pruned, ...
    group: str = "chat"  # which table it is compared in: "chat" (the model and its variants) or "base"
    note: str = ""
    extra: dict = field(default_factory=dict)


def load_variant(v: Variant, device=None):
    """(model, tokenizer) of a variant, in eval mode on `device` (quantized models stay where their backend put
    them)."""
    from modeling_nanochat.checkpoints.model_dirs import load_model, load_model_tokenizer

    if v.method is not None:
        from modeling_nanochat.compression.quantize import load_quantized
        model = load_quantized(v.model_dir, v.method)
    else:
        model = load_model(v.model_dir)
        if device is not None and not _is_quantized(model):
            model = model.to(device)
    return model.eval(), load_model_tokenizer(v.model_dir, config=model.config)


def _is_quantized(model) -> bool:
    return getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None)


def size_of(v: Variant, config) -> dict:
    """Parameters of the architecture (meta-device instance: no memory) and bytes of weight files on disk (None for
    a variant that exists only in memory)."""
    from modeling_nanochat.modeling_nanochat import NanoChatForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in NanoChatForCausalLM(config).parameters())
    disk = None
    if v.method is None:
        disk = sum(os.path.getsize(os.path.join(v.model_dir, f)) for f in os.listdir(v.model_dir)
                   if f.endswith(WEIGHT_SUFFIXES))
    return {"params": params, "disk_bytes": disk}


def _peak_here(v: Variant, batch: int, new_tokens: int) -> dict:
    """In this (fresh) process: peak memory of loading `v` and decoding `batch` x `new_tokens` tokens.

    On CPU: one warm-up load and decode first (lazy imports, backend kernels and allocator arenas would otherwise
    count as the model's), its memory is freed and handed back to the OS, then the kernel's peak-RSS counter is reset
    (`/proc/self/clear_refs`) and the peak of the second load and decode over the resident memory before it is the
    figure."""
    import gc

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_variant(v, device)
    decode_tokens(model, batch, new_tokens, device=_device_of(model))
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _release_free_heap()
        base = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    model, _ = load_variant(v, device)
    decode_tokens(model, batch, new_tokens, device=_device_of(model))
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated() - base, "memory_kind": "CUDA allocated, peak "
                f"of loading and decoding {batch} x {new_tokens} tokens"}
    return {"peak_memory_bytes": max(0, _status_bytes("VmHWM") - base),
            "memory_kind": f"CPU resident (peak RSS) of loading and decoding {batch} x {new_tokens} tokens, over the "
                           "process's resident memory before loading (after a warm-up load, its freed memory returned "
                           "to the OS)"}


def _release_free_heap() -> None:
    """Hand memory that the warm-up freed back to the OS (glibc's malloc_trim), so the baseline is what is live: malloc
    keeps freed blocks in the process, and the second load reusing them grew the resident memory by nothing (a CI run
    measured 0 bytes for a tiny model). A no-op where the C library has no malloc_trim."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(v: Variant, batch: int = 8, new_tokens: int = 32) -> dict:
    """`_peak_here` in a fresh Python process, so that one variant's allocations cannot hide another's."""
    cmd = [sys.executable, "-m", "modeling_nanochat.compression.measure", json.dumps(asdict(v)), str(batch),
           str(new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory run of {v.name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _device_of(model):
    return next(model.parameters()).device


def _prompt(model, batch: int, length: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    ids[:, 0] = model.config.bos_token_id
    return ids.to(device)


@torch.inference_mode()
def prefill_seconds(model, batch: int, length: int, device=None) -> float:
    device = device or _device_of(model)
    ids = _prompt(model, batch, length, device)
    _sync(device)
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def decode_tokens(model, batch: int, new_tokens: int, prompt_len: int = 16, device=None) -> float:
    """Seconds for `new_tokens` greedy tokens per row after a `prompt_len` prompt (the prefill is timed apart and
    subtracted, so this is the decode loop alone)."""
    device = device or _device_of(model)
    ids = _prompt(model, batch, prompt_len, device, seed=1)
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  pad_token_id=model.config.pad_token_id, attention_mask=torch.ones_like(ids))
    _sync(device)
    t0 = time.perf_counter()
    model.generate(ids, **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1})
    _sync(device)
    t1 = time.perf_counter()
    model.generate(ids, **kwargs)
    _sync(device)
    t2 = time.perf_counter()
    return max(1e-9, (t2 - t1) - (t1 - t0))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_round(model, *, prompt_len: int = 128, new_tokens: int = 32, batches=(1, 8)) -> dict:
    """One timing of prefill and decode tok/s at each batch size (the caller repeats and takes medians)."""
    out = {}
    for b in batches:
        out[f"prefill_tok_s_b{b}"] = b * prompt_len / prefill_seconds(model, b, prompt_len)
        out[f"decode_tok_s_b{b}"] = b * (new_tokens - 1) / decode_tokens(model, b, new_tokens)
    return out


def medians(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]} if rounds else {}


@torch.inference_mode()
def log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (fp32, on CPU) of `model` on `ids`."""
    logits = model(input_ids=ids.to(_device_of(model))).logits
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def divergence(model, ids: torch.Tensor, reference: torch.Tensor) -> dict:
    """How far `model`'s next-token distributions are from `reference` (the group's first model) on the same
    tokens: mean KL(reference || model) and how often the two agree on the most likely token. Far more sensitive
    than task accuracy, which a tiny model's few problems cannot resolve."""
    lp = log_probs(model, ids)
    if lp.shape != reference.shape:
        return {}
    kl = (reference.exp() * (reference - lp)).sum(-1).mean().item()
    return {"kl_to_ref": max(kl, 0.0), "top1_agree": (lp.argmax(-1) == reference.argmax(-1)).float().mean().item()}


def quality(model, tokenizer, *, token_bytes=None, val_source=None, val_tokens: int = 65536, core_bundle=None,
            core_max_per_task: int = 100, chat_data=None, chat_limit: int = 100) -> dict:
    """Val bpb, CORE and the chat tasks (each only when its data is given). Deterministic: measured once."""
    out = {}
    if val_source is not None:
        from evaluation.bpb import bpb_of_split
        out["val_bpb"] = bpb_of_split(model, tokenizer, token_bytes, val_source, "val", tokens=val_tokens)
    if core_bundle is not None:
        from evaluation.core import evaluate_core
        out["core"] = evaluate_core(model, tokenizer, core_bundle, max_per_task=core_max_per_task,
                                    device=_device_of(model), progress=False)["core"]
    if chat_data is not None:
        from evaluation.chat import evaluate_task, load_tasks
        for name, key, new in (("synth_chat", "synth_chat", 32), ("gsm8k", "synth_arith", 96)):
            if not os.path.isfile(os.path.join(chat_data, f"{name}.jsonl")):
                continue
            task = load_tasks([name], chat_data)[name]
            out[key] = evaluate_task(task, model, tokenizer, limit=chat_limit, max_new_tokens=new,
                                     progress=False)["accuracy"]
    return out


if __name__ == "__main__":  # the fresh process of `peak_memory`
    spec, batch, new = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(_peak_here(Variant(**spec), batch, new)))
