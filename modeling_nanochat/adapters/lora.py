"""LoRA / QLoRA for nanochat models through PEFT, and a merged export that loads like any other checkpoint.

Which layers get adapters (``LORA_TARGET_MODULES``, derived from the model by ``checkpoints.architecture``): the
attention projections ``q_proj k_proj v_proj o_proj`` and the MLP's ``fc1 fc2`` of every block: the matrices that
hold almost all of a block's weights. Left out on purpose:

* ``ve_gate`` (value-embedding gate, ``ve_gate_channels -> num_kv_heads``, e.g. 32x2) and ``smear_gate`` (24x1):
  a rank-16 adapter on such a matrix has more parameters than the matrix itself and adds nothing a full update
  would not; name them in ``lora_modules_to_save`` to train them fully instead.
* ``lm_head`` (and ``embed_tokens``/``value_embeds``, which are embeddings, not Linear layers): the vocabulary
  matrices. A base model that never saw the chat special tokens in pretraining can still learn the protocol through
  the block adapters (the tokens' rows exist and differ); to train the rows themselves, list ``lm_head`` /
  ``embed_tokens`` in ``lora_modules_to_save`` (full copies: large, V x d each).

The same keys drive both ways in: TRL's ``ModelConfig`` (``use_peft``, ``lora_r``, ``lora_alpha``, ``lora_dropout``,
``lora_target_modules``, ``lora_modules_to_save``, ``use_rslora``, ``use_dora``, ``load_in_4bit``/``load_in_8bit``)
as read by ``trl sft|grpo --config`` and by our recipes through ``TrlParser``.

Merged export (``python -m modeling_nanochat.adapters.lora merge --adapter DIR --output-dir DIR``): base + adapter folded
into plain weights, written as a complete checkpoint (remote-code files, auto_map, tokenizer, generation config).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

from modeling_nanochat.checkpoints import architecture
from modeling_nanochat.checkpoints.model_dirs import ModelNotFoundError, load_model
from modeling_nanochat.utils.errors import NanochatError

# Both derived from the model's module tree (checkpoints.architecture) instead of kept as lists here, so a new block
# matrix becomes a target without an edit; the names stay for the recipes and tests that import them.
# ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"): the Linear layers of the blocks, less the gates
LORA_TARGET_MODULES = architecture.lora_target_modules()
# bitsandbytes 4/8-bit layers for the matrices LoRA adapts; every other Linear layer (the gates are tiny, and the
# lm_head is kept in full precision as transformers does by default: the list replaces that default, so lm_head is
# named again) is skipped: ("lm_head", "smear_gate", "ve_gate")
QUANT_SKIP_MODULES = architecture.quant_skip_modules()
ADAPTER_CONFIG = "adapter_config.json"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA needs peft: pip install -e '.[train]' (or pip install peft)") from e
    return peft


def _get(model_args, name, default=None):
    return getattr(model_args, name, default) if model_args is not None else default


def check_target_modules(model: torch.nn.Module, target_modules) -> None:
    """Every name must match at least one Linear layer of `model`; PEFT alone would fail later or, for a typo among
    several names, silently adapt fewer layers than asked."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) or hasattr(m, "base_layer")}  # plain, or already adapted
    missing = [t for t in target_modules if t not in leaves]
    if missing:
        raise NanochatError(f"lora_target_modules {missing} match no Linear layer of this model; its Linear layers are "
                         f"{sorted(leaves)} (nanochat's default: {list(LORA_TARGET_MODULES)})")


def peft_config(model_args=None, **overrides):
    """A ``peft.LoraConfig`` from TRL's ``ModelConfig`` (None when ``use_peft`` is false), with our target modules
    when the config names none. ``overrides`` replace single fields (e.g. ``r=8``) and force LoRA on."""
    if model_args is not None and not _get(model_args, "use_peft", False) and not overrides:
        return None
    peft = _peft()
    kw = dict(task_type=_get(model_args, "lora_task_type", "CAUSAL_LM"), r=_get(model_args, "lora_r", 16),
              lora_alpha=_get(model_args, "lora_alpha", 32), lora_dropout=_get(model_args, "lora_dropout", 0.05),
              target_modules=list(_get(model_args, "lora_target_modules") or LORA_TARGET_MODULES),
              modules_to_save=_get(model_args, "lora_modules_to_save"), use_rslora=_get(model_args, "use_rslora", False),
              use_dora=_get(model_args, "use_dora", False), bias="none")
    kw.update(overrides)
    return peft.LoraConfig(**kw)


def quantization_config(model_args):
    """``BitsAndBytesConfig`` for QLoRA (``load_in_4bit``) or 8-bit LoRA (``load_in_8bit``), else None. Raises a
    clear error where bitsandbytes or a CUDA GPU is missing instead of failing deep inside the model load."""
    four, eight = bool(_get(model_args, "load_in_4bit", False)), bool(_get(model_args, "load_in_8bit", False))
    if not (four or eight):
        return None
    if four and eight:
        raise NanochatError("set either load_in_4bit or load_in_8bit, not both")
    flag = "load_in_4bit" if four else "load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(f"{flag} (quantized LoRA) needs bitsandbytes: pip install bitsandbytes (CUDA GPUs); or drop "
                           f"{flag} and train plain LoRA (use_peft: true)")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{flag} (quantized LoRA) needs a CUDA GPU; none is visible here. Drop {flag} to train plain LoRA "
                           "(use_peft: true), which runs on CPU too")
    from transformers import BitsAndBytesConfig
    if eight:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(QUANT_SKIP_MODULES))
    compute = _get(model_args, "dtype")
    compute = getattr(torch, compute) if isinstance(compute, str) and compute not in ("auto",) else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_type=_get(model_args, "bnb_4bit_quant_type", "nf4"),
                              bnb_4bit_use_double_quant=bool(_get(model_args, "use_bnb_nested_quant", False)),
                              llm_int8_skip_modules=list(QUANT_SKIP_MODULES))


def wrap_model(model, model_args=None, gradient_checkpointing: bool = False, **overrides):
    """Return ``model`` with LoRA adapters (a ``peft.PeftModel``; only the adapters require grad) when
    ``model_args.use_peft`` is set (or ``overrides`` are given), else ``model`` unchanged. A model loaded in 4/8 bit is
    prepared for k-bit training first; with gradient checkpointing the embeddings' outputs are made to require grad
    so checkpointed blocks still backpropagate into the adapters (what TRL does when it wraps the model itself)."""
    config = peft_config(model_args, **overrides)
    if config is None:
        return model
    peft = _peft()
    check_target_modules(model, config.target_modules)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model = peft.get_peft_model(model, config)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


# ----------------------------------------------------------------------------------------------------------------
# merged export


def _adapter_base(adapter_dir: str) -> str | None:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"{path} not found: --adapter must be a PEFT adapter dir (what `trl sft ... use_peft: "
                                "true` saves); a full checkpoint needs no merge")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") not in (None, "LORA"):
        raise NanochatError(f"{path} holds a {cfg.get('peft_type')} adapter; only LoRA adapters are merged here")
    return cfg.get("base_model_name_or_path")


def merge_adapter(adapter_dir: str, output_dir: str, base: str | None = None, dtype: str | None = None,
                  overwrite: bool = False) -> str:
    """Fold a LoRA adapter into its base model and write a complete checkpoint to ``output_dir`` (atomically).

    The base is ``base`` or the adapter's ``base_model_name_or_path``; the merge runs in fp32 and the weights are
    saved in ``dtype`` (default: the base checkpoint's). Tokenizer and token_bytes come from the base (LoRA does not
    change the vocabulary), else from the adapter dir."""
    from transformers import PretrainedConfig

    from modeling_nanochat.utils.io import atomic_dir
    from modeling_nanochat.modeling_nanochat import NanoChatForCausalLM
    from modeling_nanochat.tokenizer.tokenizer import TOKEN_BYTES_FILE, load_token_bytes, load_tokenizer, save_tokenizer

    peft = _peft()
    named = _adapter_base(adapter_dir)  # also checks that this is a LoRA adapter dir
    base = base or named
    if not base:
        raise NanochatError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base model: pass --base DIR")
    target = atomic_dir(output_dir, overwrite)  # refuses a non-empty output dir before the work, not after
    if dtype is None:  # config.json of a local dir or a Hub repo
        base_cfg, _ = PretrainedConfig.get_config_dict(base)
        dtype = base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "float32"
    # the base's generation config (stop tokens, sampling defaults) comes along with from_pretrained
    model = load_model(base, NanoChatForCausalLM, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload(safe_merge=True)
    merged.to(getattr(torch, dtype))
    try:
        tok_src, tokenizer = base, load_tokenizer(base)
    except (OSError, ValueError):
        tok_src, tokenizer = adapter_dir, load_tokenizer(adapter_dir)
    # token_bytes.pt (for bits per byte) when the source dir has it, else save_tokenizer recomputes it
    token_bytes = load_token_bytes(tok_src) if os.path.isfile(os.path.join(tok_src, TOKEN_BYTES_FILE)) else None
    with target as tmp:
        merged.save_pretrained(tmp)  # weights, config with auto_map, the two remote-code files, generation config
        save_tokenizer(tokenizer, tmp, token_bytes)
    return output_dir


def main(argv=None) -> int:
    from modeling_nanochat.utils.errors import cli_main

    return cli_main(_main, argv)


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m modeling_nanochat.adapters.lora", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="fold a LoRA adapter into its base and write a normal checkpoint")
    m.add_argument("--adapter", required=True, help="adapter dir (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--output-dir", required=True)
    m.add_argument("--base", help="base checkpoint (default: the adapter's base_model_name_or_path)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="saved dtype (default: the base's)")
    m.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = merge_adapter(args.adapter, args.output_dir, base=args.base, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
