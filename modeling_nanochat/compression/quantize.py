"""Post-training quantization through transformers' `quantization_config`, so that the result is an ordinary
checkpoint: `from_pretrained(dir)` loads it (and so do the app and the chat CLI), no code of ours needed.

Methods (`METHODS`): torchao int8 weight-only, int8 dynamic-activation + int8 weight, int4 weight-only;
optimum-quanto int8 / int4 / float8 weights; bitsandbytes 8-bit (LLM.int8) and 4-bit NF4. Whether a method runs
here is *probed*, not assumed (`available`): a tiny model of ours is quantized, run, saved and reloaded with the
method, and the first thing that fails is the one-line reason (a missing package names its pip install; a backend
without a kernel for this device says so). The probe also finds what transformers cannot save (optimum-quanto's
weights are "not serializable"): those methods are measured by quantizing at load time (`load_quantized`).

What stays in high precision (`keep`) is a named choice, `KEEP_HIGH_PRECISION`, four groups read off the model
(`checkpoints/architecture.py: high_precision_groups`):

* ``embeddings`` (`embed_tokens`) and ``value_embeds`` (`value_embeds.*`): nn.Embedding tables. None of these
  backends converts an Embedding through `quantization_config`, so they stay float under every setting; they are
  named so that the choice is explicit and stays so if a backend starts converting them.
* ``head`` (`lm_head`): its softcapped logits are the model's output; quantizing it costs the most per byte saved.
* ``gates`` (`smear_gate`, `ve_gate`): a few hundred weights each that scale whole residual contributions.

``keep="default"`` keeps all four groups; ``keep="none"`` quantizes every Linear the backend supports, head and
gates included, so that the lab can measure what the default buys (`recipes/compress.py`).

bitsandbytes NF4 on CPU (bitsandbytes 0.50): on a CPU with AVX512-BF16, `Linear4bit.forward` repacks its weight
into a CPU kernel layout on the first forward (`_convert_weight_packed_for_cpu`), and `save_pretrained` unpacks it
with a "best-effort" inverse (`_convert_weight_packed_for_cpu_inverse`) that does not give back the original bytes:
a model saved after a forward reloads to other logits (max diff 9.6 on the tests' tiny model), and the in-memory
model is changed by the save too. `quantize_model` therefore saves straight after quantizing, before any forward,
and the saved checkpoint reloads to exactly the logits of a freshly quantized model (tested). Do not
`save_pretrained` an NF4 model that has already run on CPU.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import warnings

import torch

from modeling_nanochat.utils.errors import NanochatError

# name -> (backend package to import, pip name, description)
METHODS = {
    "torchao-int8-wo": ("torchao", "torchao", "torchao int8 weight-only"),
    "torchao-int8-dyn": ("torchao", "torchao", "torchao int8 dynamic activations + int8 weights"),
    "torchao-int4-wo": ("torchao", "torchao", "torchao int4 weight-only (group size 128)"),
    "quanto-int8": ("optimum.quanto", "optimum-quanto", "optimum-quanto int8 weights"),
    "quanto-int4": ("optimum.quanto", "optimum-quanto", "optimum-quanto int4 weights"),
    "quanto-fp8": ("optimum.quanto", "optimum-quanto", "optimum-quanto float8 (e4m3) weights"),
    "bnb-8bit": ("bitsandbytes", "bitsandbytes", "bitsandbytes LLM.int8 (8-bit)"),
    "bnb-nf4": ("bitsandbytes", "bitsandbytes", "bitsandbytes 4-bit NF4"),
}
KEEP_CHOICES = ("default", "none")
# The groups of modules `keep="default"` leaves in float (see the module docstring); names: `keep_modules`.
KEEP_HIGH_PRECISION = {
    "embeddings": "the token embedding table (embed_tokens)",
    "value_embeds": "the value-embedding tables (value_embeds)",
    "head": "the output head (lm_head)",
    "gates": "the tiny smear and value-embedding gates (smear_gate, ve_gate)",
}
RECORD_FILE = "quantization.json"


class QuantizeError(NanochatError):
    """A quantization request this machine, this method or these paths cannot satisfy."""


def keep_modules(keep: str = "default", model=None) -> list[str]:
    """Module names (leaf names, as transformers matches them) left in high precision: every name of every group of
    `KEEP_HIGH_PRECISION` for "default", none for "none"."""
    if keep not in KEEP_CHOICES:
        raise QuantizeError(f"--keep {keep!r} is not a choice", f"choose one of {', '.join(KEEP_CHOICES)}")
    if keep == "none":
        return []
    from modeling_nanochat.checkpoints.architecture import high_precision_groups

    groups = high_precision_groups(model)
    assert set(groups) == set(KEEP_HIGH_PRECISION), (groups, KEEP_HIGH_PRECISION)
    return [name for group in KEEP_HIGH_PRECISION for name in groups[group]]


def quantization_config(method: str, keep: str = "default"):
    """transformers' quantization config for `method`."""
    if method not in METHODS:
        raise QuantizeError(f"unknown method {method!r}", f"choose one of {', '.join(METHODS)}")
    skip = kept_modules(method, keep)
    if method.startswith("torchao"):
        from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                          Int8WeightOnlyConfig)
        from transformers import TorchAoConfig
        quant = {"torchao-int8-wo": Int8WeightOnlyConfig, "torchao-int8-dyn": Int8DynamicActivationInt8WeightConfig,
                 "torchao-int4-wo": lambda: Int4WeightOnlyConfig(group_size=128)}[method]()
        return TorchAoConfig(quant_type=quant, modules_to_not_convert=skip)
    if method.startswith("quanto"):
        from transformers import QuantoConfig
        return QuantoConfig(weights={"quanto-int8": "int8", "quanto-int4": "int4", "quanto-fp8": "float8"}[method],
                            modules_to_not_convert=skip)
    from transformers import BitsAndBytesConfig
    if method == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    # compute in fp32: our logits are fp32 anyway, and bf16 is ~400x slower on CPU
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              llm_int8_skip_modules=skip)


def kept_modules(method: str, keep: str = "default") -> list[str]:
    """What `method` leaves in float under `keep`: `keep_modules(keep)`, except that bnb-nf4 under "none" keeps
    the layers its CPU kernel cannot run (`_nf4_cpu_unsupported`)."""
    if method == "bnb-nf4" and keep == "none":
        return list(_nf4_cpu_unsupported())
    return keep_modules(keep)


def _nf4_cpu_unsupported(model=None) -> tuple[str, ...]:
    """Leaf names of the Linear layers bitsandbytes' CPU 4-bit kernel cannot run: on a CPU with AVX512-BF16 its first
    forward repacks the weight in blocks of 32 output features and asserts `out_features % 32 == 0`; the gates have
    1 and n_kv_head outputs. `keep="none"` for bnb-nf4 means every Linear the backend supports, so these stay float."""
    from modeling_nanochat.checkpoints.architecture import reference_model

    model = reference_model() if model is None else model
    return tuple(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and m.out_features % 32}))


def _quantized_load(model_dir: str, method: str, keep: str = "default", device: str = "cpu"):
    from modeling_nanochat.checkpoints.model_dirs import load_model

    placement = {} if device == "cpu" else {"device_map": {"": device}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # backends warn about CPU kernels and deprecations on every load
        return load_model(model_dir, quantization_config=quantization_config(method, keep), **placement).eval()


def load_quantized(model_dir: str, method: str, keep: str = "default", device: str = "cpu"):
    """`model_dir` quantized at load time with `method` on `device` (`from_pretrained(dir, quantization_config=...)`):
    how the lab measures the methods whose weights transformers cannot save (optimum-quanto)."""
    ok, reason = available(method, device)
    if not ok:
        raise QuantizeError(f"{method} is not available here: {reason}",
                            "pick another method (python recipes/quantize.py --list shows what runs here)")
    return _quantized_load(model_dir, method, keep, device)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


@functools.cache
def probe(method: str, device: str = "cpu") -> dict:
    """Run `method` end to end on a tiny model of ours on `device` of this machine: {"available", "reason",
    "saveable", "reload_exact"}. Cached per process (a few seconds per method)."""
    module, pip, _ = METHODS[method]
    if device != "cpu":
        kind = torch.device(device).type
        backend = getattr(torch, kind, None)
        if backend is None or not backend.is_available():
            return {"available": False, "reason": f"this machine has no {device} device", "saveable": False,
                    "reload_exact": False}
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        return {"available": False, "reason": f"{pip} is not installed (pip install {pip}, or the `compress` extra: "
                "pip install -e '.[compress]')", "saveable": False, "reload_exact": False}
    from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM

    # 256 wide: int4 group size 128 and every backend's shape rules are met, as for real models
    config = NanoChatConfig(depth=2, hidden_size=256, num_attention_heads=2, vocab_size=512,
                            max_position_embeddings=64)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (1, 12))
    out = {"available": False, "reason": "", "saveable": False, "reload_exact": False}
    reason = _torchao_kernel_check(method, device) if module == "torchao" else None
    if reason:
        return {**out, "reason": reason}
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        src, dst = os.path.join(tmp, "src"), os.path.join(tmp, "dst")
        model = NanoChatForCausalLM(config)
        with torch.no_grad():  # nanochat zero-inits projections; give every matrix something to quantize
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(src)
        try:
            q = _quantized_load(src, method, device=device)
        except Exception as e:  # any backend failure is the reason, in one line
            return {**out, "reason": f"cannot quantize on this machine ({_first_line(e)})"}
        # saved BEFORE its first forward, as quantize_model does: bitsandbytes 0.50's CPU 4-bit path repacks the
        # weights on the first forward, and a save_pretrained after that corrupts the saved AND the in-memory model
        try:
            q.save_pretrained(dst)
            out["saveable"] = True
        except Exception as e:
            out["reason"] = f"transformers cannot save its weights ({_first_line(e)})"
        try:  # under inference_mode, as the project's generation and evaluation run models
            with torch.inference_mode():
                want = q(ids.to(_device_of(q))).logits.clone()
        except Exception as e:
            return {**out, "saveable": False, "reason": f"cannot run here under torch.inference_mode, which "
                    f"generation and evaluation use ({_first_line(e)})"}
        out["available"] = True
        if not out["saveable"]:
            return out
        try:
            from modeling_nanochat.checkpoints.model_dirs import load_model
            back = load_model(dst, **({} if device == "cpu" else {"device_map": {"": device}})).eval()
            with torch.no_grad():
                got = back(ids.to(_device_of(back))).logits
            out["reload_exact"] = bool(torch.equal(got.cpu(), want.cpu()))
            out["reload_max_diff"] = float((got.cpu() - want.cpu()).abs().max())
            if not out["reload_exact"]:
                out["reason"] = f"its saved checkpoint reloads to other logits (max diff {out['reload_max_diff']:.3g})"
        except Exception as e:
            out["reason"] = f"saved, but the reload fails ({_first_line(e)})"
    return out


def _torchao_kernel_check(method: str, device: str = "cpu") -> str | None:
    """torchao's own error for a config without a kernel here (transformers would only say 'conversion failed'):
    a tiny Linear quantized and run on `device`."""
    from torchao.quantization import quantize_

    layer = torch.nn.Sequential(torch.nn.Linear(256, 256)).to(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(layer, quantization_config(method).quant_type)
            layer(torch.randn(2, 256, device=device))
    except Exception as e:
        return f"no kernel for this device ({_first_line(e)})"
    return None


class _quiet:
    """transformers' load reports and the backends' warnings off while probing."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging
        self._level, self._bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging
        self._warnings.__exit__(*exc)
        hf_logging.set_verbosity(self._level)
        if self._bars:
            hf_logging.enable_progress_bar()
        return False


def _device_of(model):
    return next(model.parameters()).device


def available(method: str, device: str = "cpu") -> tuple[bool, str]:
    """(runs on `device` of this machine, one-line reason when not), found by trying it (`probe`, cached)."""
    if method not in METHODS:
        raise QuantizeError(f"unknown method {method!r}", f"choose one of {', '.join(METHODS)}")
    p = probe(method, device)
    return p["available"], p["reason"]


def saveable(method: str, device: str = "cpu") -> bool:
    """Whether a checkpoint quantized with `method` can be saved and reloaded to the same logits here."""
    p = probe(method, device)
    return p["available"] and p["saveable"] and p["reload_exact"]


def linear_weight_bytes(model, names: list[str]) -> int:
    """Bytes of the float weights of the Linear layers named (full module names)."""
    modules = dict(model.named_modules())
    return sum(modules[n].weight.numel() * modules[n].weight.element_size() for n in names)


def _converted_modules(model, skip: list[str]) -> list[str]:
    from transformers.quantizers.quantizers_utils import should_convert_module
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and should_convert_module(n, skip)]


def saved_bytes(model_dir: str, prefixes: list[str]) -> int:
    """Bytes of the saved tensors under the given module names (weights and their scales, zero points, quant
    states), read from the safetensors headers."""
    total = 0
    for f in sorted(os.listdir(model_dir)):
        if not f.endswith(".safetensors"):
            continue
        with open(os.path.join(model_dir, f), "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key != "__metadata__" and any(key.startswith(p + ".") for p in prefixes):
                total += info["data_offsets"][1] - info["data_offsets"][0]
    return total


def quantize_model(model_dir: str, method: str, output_dir: str, *, keep: str = "default",
                   overwrite: bool = False) -> dict:
    """Quantize `model_dir` with `method` into `output_dir` (model, tokenizer, `quantization.json`), written
    atomically: a failure leaves no half-written dir and an existing one untouched. Returns the record."""
    from modeling_nanochat.checkpoints.model_dirs import check_local_model, load_model
    from modeling_nanochat.utils.io import atomic_dir, atomic_write_json

    check_local_model(model_dir)
    keep_modules(keep)
    ok, reason = available(method)
    if not ok:
        raise QuantizeError(f"{method} is not available here: {reason}",
                            "pick another method (python recipes/quantize.py --list shows what runs here)")
    if not saveable(method):
        why = probe(method)["reason"] or "its saved checkpoint does not reload to the same logits here"
        raise QuantizeError(f"{method} cannot be saved as a checkpoint: {why}",
                            "quantize at load time instead: AutoModelForCausalLM.from_pretrained(dir, "
                            "quantization_config=...), i.e. compression.quantize.load_quantized (recipes/compress.py "
                            "measures it that way)")
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        skip = kept_modules(method, keep)
        full = load_model(model_dir)
        converted = _converted_modules(full, skip)
        before = linear_weight_bytes(full, converted)
        del full
        model = _quantized_load(model_dir, method, keep)
        model.save_pretrained(tmp)
        _copy_tokenizer(model_dir, tmp)
        after = saved_bytes(tmp, converted)
        record = {"method": method, "description": METHODS[method][2], "keep": keep,
                  "kept_groups": [] if keep == "none" else list(KEEP_HIGH_PRECISION), "kept_modules": skip,
                  "source": os.path.abspath(model_dir), "quantized_modules": len(converted),
                  "quantized_bytes_before": before, "quantized_bytes_after": after,
                  "versions": _versions(METHODS[method][1])}
        atomic_write_json(os.path.join(tmp, RECORD_FILE), record)
    return record


def _copy_tokenizer(src: str, dst: str) -> None:
    from modeling_nanochat.checkpoints.model_dirs import TOKENIZER_FILES
    from modeling_nanochat.tokenizer.tokenizer import TOKEN_BYTES_FILE

    for name in (*TOKENIZER_FILES, TOKEN_BYTES_FILE, "chat_template.jinja", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(src, name)) and not os.path.exists(os.path.join(dst, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def _versions(pip: str) -> dict:
    out = {}
    for name in (pip, "transformers", "torch"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out
