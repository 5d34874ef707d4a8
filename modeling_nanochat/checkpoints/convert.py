"""Convert checkpoints: nanochat's own format <-> ours, transformers' `nanochat` (Oct-2025) <-> ours.

    python -m modeling_nanochat.checkpoints.convert --input-dir SRC --output-dir DST [--step N] [--arch ERA] [--tokenizer-dir D]
    python -m modeling_nanochat.checkpoints.convert --input-dir OURS --output-dir DST --to nanochat

Unlike transformers' own converter, nothing is dropped silently: every key must map to a parameter of the target
model with the right shape, or the conversion stops and names the keys. Outputs are written to a temporary
directory and moved into place only when complete, so an existing checkpoint is never left half-overwritten.
"""

import argparse
import glob
import json
import os
import re
import shutil
import sys

import torch
from safetensors.torch import load_file

from modeling_nanochat.checkpoints.architecture import NANOCHAT_KEY_TEMPLATES
from modeling_nanochat.configuration_nanochat import ARCHITECTURE_ERAS, NanoChatConfig
from modeling_nanochat.utils.io import atomic_dir
from modeling_nanochat.utils.errors import CheckpointError, cli_main

# nanochat key <-> our key; {i} is a layer index. nanochat's names are an external format, so they cannot be derived
# from our model: they are stated once, with the other architecture facts, in checkpoints.architecture (whose test
# checks that their side covers every parameter of ours in every era).
KEY_TEMPLATES = NANOCHAT_KEY_TEMPLATES


def _rules(reverse=False):
    pairs = [(b, a) if reverse else (a, b) for a, b in KEY_TEMPLATES]
    return [(re.escape(src).replace(r"\{i\}", r"(\d+)"), dst.replace("{i}", r"\1")) for src, dst in pairs]


_TO_OURS, _TO_NANOCHAT = _rules(), _rules(reverse=True)


class ConversionError(CheckpointError):
    """A checkpoint that cannot be converted faithfully; the message names the problem and the fix."""


def _rename(state, rules, what):
    out, unknown = {}, []
    for key, tensor in state.items():
        for pattern, target in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{len(unknown)} {what} key(s) have no counterpart and would be lost: "
                              f"{sorted(unknown)[:10]}. This checkpoint is from an architecture this converter does "
                              "not know; nothing was written.")
    return out


def check_state_dict(state, config):
    """Every parameter of the target model present with the right shape, nothing extra."""
    with torch.device("meta"):
        from modeling_nanochat.modeling_nanochat import NanoChatForCausalLM
        expected = {k: tuple(v.shape) for k, v in NanoChatForCausalLM(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"missing {missing[:10]}")
    if extra:
        problems.append(f"unexpected {extra[:10]}")
    if wrong:
        problems.append("wrong shapes " + ", ".join(f"{k}: {tuple(state[k].shape)} != {expected[k]}" for k in wrong[:5]))
    if problems:
        raise ConversionError("checkpoint does not match the model config: " + "; ".join(problems) +
                              ". Is the checkpoint complete and the --arch/--step right?")


# ----------------------------------------------------------------------------------------------------------------
# nanochat's own format


def _latest_step(src):
    steps = sorted(int(m.group(1)) for f in os.listdir(src) if (m := re.fullmatch(r"model_(\d+)\.pt", f)))
    if not steps:
        raise ConversionError(f"no model_<step>.pt in {src}; point --input-dir at a nanochat checkpoint directory "
                              "(e.g. ~/.cache/nanochat/base_checkpoints/d20)")
    return steps[-1]


def infer_era(state):
    """The architecture era from the keys (see ARCHITECTURE_ERAS); raises when the keys cannot tell."""
    # reads nanochat's own key names (an external format, see NANOCHAT_KEY_TEMPLATES in checkpoints.architecture),
    # so the markers stay stated here: smear from 2026-03-14, lambdas from 2026-01, 12-channel gates from 2026-03-09
    if "smear_gate.weight" in state:
        return "2026-03-14"
    if "resid_lambdas" not in state:
        return "2025-10"
    gates = [v for k, v in state.items() if k.endswith("attn.ve_gate.weight")]
    if not gates or gates[0].shape[1] == 12:
        return "2026-03-09" if gates else "2026-01"
    raise ConversionError(
        "this checkpoint (value-embedding gates of 32 channels) is from 2026-01-16..2026-03-08, when the logit softcap "
        "was 15 until 2026-03-01 and 20 from 2026-03-02: pass --arch 2026-01 or --arch 2026-03-02. Known eras: "
        + ", ".join(sorted(ARCHITECTURE_ERAS)))


def config_from_nanochat(meta_config, state, era):
    mc = meta_config
    ve_layers = sorted(int(k.split(".")[1]) for k in state if re.fullmatch(r"value_embeds\.\d+\.weight", k))
    wte_rows = state["transformer.wte.weight"].shape[0]
    vocab = mc["vocab_size"]
    # checkpoints before 2025-12-09 have unpadded embeddings
    pad_to = 64 if -(-vocab // 64) * 64 == wte_rows else (1 if wte_rows == vocab else None)
    if pad_to is None:
        raise ConversionError(f"wte has {wte_rows} rows but the vocabulary has {vocab} tokens (padded to 64: "
                              f"{-(-vocab // 64) * 64}); is the tokenizer the one this model was trained with?")
    kw = dict(num_hidden_layers=mc["n_layer"], hidden_size=mc["n_embd"], num_attention_heads=mc["n_head"],
              num_key_value_heads=mc.get("n_kv_head", mc["n_head"]), head_dim=mc["n_embd"] // mc["n_head"],
              vocab_size=vocab, pad_vocab_size_to=pad_to, max_position_embeddings=mc.get("sequence_len", 2048),
              value_embeds=bool(ve_layers), value_embed_layers=ve_layers)
    if ARCHITECTURE_ERAS[era]["window_rule"] is not None:  # eras before windows existed attend to everything
        kw["window_pattern"] = mc.get("window_pattern", "L")  # nanochat's loader: missing -> "L"
    return NanoChatConfig.for_era(era, **kw)


def load_nanochat_checkpoint(src, step=None, arch=None):
    """Read model_<step>.pt + meta_<step>.json; returns (our state dict, config, meta, era)."""
    step = _latest_step(src) if step is None else step
    model_path, meta_path = os.path.join(src, f"model_{step:06d}.pt"), os.path.join(src, f"meta_{step:06d}.json")
    for p in (model_path, meta_path):
        if not os.path.exists(p):
            raise ConversionError(f"{p} is missing; nanochat saves model_<step>.pt and meta_<step>.json together")
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated file
        raise ConversionError(f"cannot read {model_path}: {e}. The file is corrupt or incomplete.") from e
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile'd models
    with open(meta_path) as f:
        meta = json.load(f)
    if "model_config" not in meta:
        raise ConversionError(f"{meta_path} has no model_config; is it a nanochat meta file?")
    if arch is not None and arch not in ARCHITECTURE_ERAS:
        raise ConversionError(f"unknown --arch {arch!r}; choose one of {sorted(ARCHITECTURE_ERAS)}")
    era = arch or infer_era(state)
    config = config_from_nanochat(meta["model_config"], state, era)
    ours = _rename(state, _TO_OURS, "nanochat")
    check_state_dict(ours, config)
    return ours, config, meta, era


# ----------------------------------------------------------------------------------------------------------------
# transformers' own `nanochat` (Oct-2025 architecture)


def config_from_transformers_nanochat(cfg):
    """Same Oct-2025 architecture, with that port's numeric choices (eps 1e-6, fp32 rotary tables)."""
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10_000.0))
    vocab = cfg["vocab_size"]
    return NanoChatConfig.for_era(
        "2025-10", num_hidden_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"], vocab_size=vocab, pad_vocab_size_to=1,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_bf16_tables=False, final_logit_softcapping=cfg.get("final_logit_softcapping"),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"))


def _read_safetensors(path):
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own SafetensorError for a truncated or foreign file
        raise ConversionError(f"cannot read {path}: {e} ({os.path.getsize(path):,} bytes on disk); the file is "
                              "truncated or corrupt: copy or download it again") from None


def _load_safetensors_dir(src):
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    if not files:
        raise ConversionError(f"no *.safetensors in {src}")
    state = {}
    for f in files:
        state.update(_read_safetensors(f))
    # some writers save rotary inv_freq buffers; they are recomputed, never weights
    return {k: v for k, v in state.items() if not k.endswith("inv_freq")}


def load_transformers_nanochat(src):
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    config = config_from_transformers_nanochat(cfg)
    state = _load_safetensors_dir(src)
    check_state_dict(state, config)  # same parameter names as ours: the rename is the identity
    return state, config


# ----------------------------------------------------------------------------------------------------------------
# writing


def save_hf_checkpoint(state, config, out_dir, tokenizer_src=None, overwrite=False, extra_files=None, tokenizer=None):
    """Write a complete HF directory atomically: weights, config with auto_map, modeling files, generation config,
    tokenizer (converted from nanochat's tokenizer.pkl when `tokenizer_src` is a nanochat tokenizer dir)."""
    from modeling_nanochat.modeling_nanochat import NanoChatForCausalLM
    with atomic_dir(out_dir, overwrite) as tmp:
        if tokenizer is None and tokenizer_src is not None:
            from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer
            tokenizer = convert_nanochat_tokenizer(tokenizer_src, tmp)
        elif tokenizer is not None:
            from modeling_nanochat.tokenizer.tokenizer import save_tokenizer
            save_tokenizer(tokenizer, tmp)
        if tokenizer is not None:
            config.bos_token_id = tokenizer.convert_tokens_to_ids("<|bos|>")
            config.eos_token_id = tokenizer.convert_tokens_to_ids("<|assistant_end|>")
            config.pad_token_id = config.bos_token_id  # nanochat pads with <|bos|> and masks it
            if len(tokenizer) != config.vocab_size:
                raise ConversionError(f"the tokenizer has {len(tokenizer)} tokens but the model {config.vocab_size}; "
                                      "pass the tokenizer the model was trained with (--tokenizer-dir)")
        with torch.device("meta"):
            model = NanoChatForCausalLM(config)  # its generation config stops on <|assistant_end|> and <|bos|>
        # writes weights, config with auto_map (all three Auto classes) and the two remote-code files
        model.save_pretrained(tmp, state_dict=state)
        for name, payload in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(payload, f, indent=2)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# ours -> nanochat


def to_nanochat(src, out_dir, step=None, overwrite=False):
    """Write model_<step>.pt, meta_<step>.json, tokenizer.pkl and token_bytes.pt that nanochat's code loads."""
    config = NanoChatConfig.from_pretrained(src)
    state = _load_safetensors_dir(src)
    check_state_dict(state, config)
    nano = _rename(state, _TO_NANOCHAT, "nanochat-hf")
    origin = {}
    origin_path = os.path.join(src, "nanochat_meta.json")
    if os.path.exists(origin_path):
        with open(origin_path) as f:
            origin = json.load(f)
    step = step if step is not None else origin.get("step", 0)
    model_config = {
        "sequence_len": config.max_position_embeddings, "vocab_size": config.vocab_size,
        "n_layer": config.num_hidden_layers, "n_head": config.num_attention_heads,
        "n_kv_head": config.num_key_value_heads, "n_embd": config.hidden_size,
        "window_pattern": config.window_pattern or "L",
    }
    meta = dict(origin)
    meta.update(step=step, model_config=model_config)
    with atomic_dir(out_dir, overwrite) as tmp:
        torch.save(nano, os.path.join(tmp, f"model_{step:06d}.pt"))
        with open(os.path.join(tmp, f"meta_{step:06d}.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.exists(os.path.join(src, "tokenizer.json")):
            from transformers import AutoTokenizer
            _save_tiktoken_pickle(AutoTokenizer.from_pretrained(src), tmp)
            if os.path.exists(os.path.join(src, "token_bytes.pt")):
                shutil.copyfile(os.path.join(src, "token_bytes.pt"), os.path.join(tmp, "token_bytes.pt"))
    return out_dir


def to_transformers_nanochat(src, out_dir, overwrite=False):
    """Ours -> transformers' built-in `nanochat` type. Only faithful for the Oct-2025 subset of the architecture
    with that port's numerics, so anything else is refused with the list of fields that differ."""
    from transformers import NanoChatConfig as HFConfig, NanoChatForCausalLM as HFModel
    config = NanoChatConfig.from_pretrained(src)
    need = dict(value_embeds=False, residual_lambdas=False, smear=False, backout=False, window_pattern=None,
                qk_norm_scale=1.0, rope_bf16_tables=False, long_window=-1)
    differ = {k: getattr(config, k) for k, v in need.items() if getattr(config, k) != v}
    if differ:
        raise ConversionError(f"transformers' 'nanochat' class cannot express {differ}: only Oct-2025-architecture "
                              "checkpoints (with fp32 rotary tables) export to it; keep this one as nanochat_hf")
    state = _load_safetensors_dir(src)
    hf_config = HFConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, final_logit_softcapping=config.final_logit_softcapping,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    if config.padded_vocab_size != config.vocab_size:
        raise ConversionError("transformers' 'nanochat' has no vocabulary padding; this checkpoint pads "
                              f"{config.vocab_size} to {config.padded_vocab_size}")
    with atomic_dir(out_dir, overwrite) as tmp:
        with torch.device("meta"):
            model = HFModel(hf_config)
        model.save_pretrained(tmp, state_dict=state)
        for name in os.listdir(src):
            if name.startswith("tokenizer") or name in ("special_tokens_map.json", "chat_template.jinja",
                                                        "generation_config.json", "token_bytes.pt"):
                shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
    return out_dir


def _save_tiktoken_pickle(tokenizer, out_dir):
    """nanochat's tokenizer.pkl is a pickled tiktoken.Encoding: raw token bytes -> rank, specials after them."""
    try:
        import pickle
        import tiktoken
    except ImportError as e:
        raise ConversionError("writing nanochat's tokenizer.pkl needs tiktoken: pip install tiktoken") from e
    from modeling_nanochat.tokenizer.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, _token_raw_bytes
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    ranks = {_token_raw_bytes(tok): idx for tok, idx in vocab.items() if tok not in SPECIAL_TOKENS}
    specials = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    with open(os.path.join(out_dir, "tokenizer.pkl"), "wb") as f:
        pickle.dump(enc, f)


# ----------------------------------------------------------------------------------------------------------------


def convert(input_dir, output_dir, step=None, arch=None, tokenizer_dir=None, to="nanochat_hf", overwrite=False,
            dtype="keep"):
    if not os.path.isdir(input_dir):
        raise ConversionError(f"no such directory: {input_dir}", "pass the checkpoint directory as --input-dir")
    if to == "nanochat":
        return to_nanochat(input_dir, output_dir, step=step, overwrite=overwrite)
    if to == "transformers-nanochat":
        return to_transformers_nanochat(input_dir, output_dir, overwrite=overwrite)
    cfg_path = os.path.join(input_dir, "config.json")
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path) as f:
                model_type = json.load(f).get("model_type")
        except (ValueError, AttributeError) as e:
            raise ConversionError(f"{cfg_path} is not a valid config.json ({e})") from None
        if model_type != "nanochat":
            raise ConversionError(f"{input_dir} is a transformers checkpoint of type {model_type!r}; this converter "
                                  "reads nanochat's own format or transformers' 'nanochat' type")
        state, config = load_transformers_nanochat(input_dir)
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(input_dir) if os.path.exists(os.path.join(input_dir, "tokenizer.json")) \
            else None
        state = _cast(state, dtype)
        return save_hf_checkpoint(state, config, output_dir, overwrite=overwrite, tokenizer=tok)
    state, config, meta, era = load_nanochat_checkpoint(input_dir, step=step, arch=arch)
    tok_dir = tokenizer_dir or input_dir
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.pkl")):
        raise ConversionError(f"no tokenizer.pkl in {tok_dir}; nanochat keeps it in $NANOCHAT_BASE_DIR/tokenizer — "
                              "pass --tokenizer-dir")
    config.nanochat_era = era
    state = _cast(state, dtype)
    return save_hf_checkpoint(state, config, output_dir, tokenizer_src=tok_dir, overwrite=overwrite,
                              extra_files={"nanochat_meta.json": meta})


def _cast(state, dtype):
    """'keep' preserves nanochat's mixed dtypes (bf16 embeddings from GPU runs), so --to nanochat is bit-exact."""
    if dtype == "keep":
        return state
    return {k: v.to(getattr(torch, dtype)) for k, v in state.items()}


def main(argv=None):
    return cli_main(_main, argv)


def _main(argv=None):
    p = argparse.ArgumentParser(prog="python -m modeling_nanochat.checkpoints.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-dir", required=True, help="nanochat checkpoint dir, transformers 'nanochat' dir, or ours")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--arch", default=None, choices=sorted(ARCHITECTURE_ERAS),
                   help="architecture era, when it cannot be inferred from the keys")
    p.add_argument("--tokenizer-dir", default=None, help="dir with tokenizer.pkl (default: --input-dir)")
    p.add_argument("--to", default="nanochat_hf", choices=["nanochat_hf", "nanochat", "transformers-nanochat"],
                   help="target format (default nanochat_hf, ours); transformers-nanochat is transformers' own "
                        "Oct-2025 class and takes only checkpoints of that architecture")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16"])
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir (atomically)")
    args = p.parse_args(argv)
    out = convert(args.input_dir, args.output_dir, step=args.step, arch=args.arch, tokenizer_dir=args.tokenizer_dir,
                  to=args.to, overwrite=args.overwrite, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
