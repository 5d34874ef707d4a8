"""Finding and checking trained models on disk: what the chat CLI, the app and the publisher point at.

A *model directory* is what `save_pretrained` writes: `config.json` plus safetensors weights. Training writes them
as `runs/<name>/checkpoint-<step>/` while it runs and the final model at `runs/<name>/` when it ends
(recipes/pretrain.py --output-dir), so "the newest model" is: the run whose model was written last, and in it the
final model if there is one, else its highest checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from modeling_nanochat.checkpoints.training_state import CHECKPOINT_NAME
from modeling_nanochat.utils.errors import CheckpointError


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """No model where one was asked for (also a FileNotFoundError, which callers of `resolve_model` catch)."""

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_SKIP = ("training_state",)  # optimizer/loader state inside checkpoints, never a model


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and any((p / w).is_file() for w in WEIGHT_FILES)


def _model_dirs(root: Path, depth: int):
    """Model directories at most `depth` levels below `root` (a speedrun may nest runs as runs/<name>/<stage>)."""
    if depth < 0 or not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith(".") or child.name in _SKIP:
            continue  # .tmp-* dirs are half-written checkpoints
        if is_model_dir(child):
            yield child
        yield from _model_dirs(child, depth - 1)


def newest_model(runs_dir: str | os.PathLike = "runs") -> str | None:
    """The final model of the most recently written run under `runs_dir`, else that run's highest checkpoint."""
    runs: dict[Path, list[Path]] = {}
    for d in _model_dirs(Path(runs_dir), depth=3):
        run = d.parent if CHECKPOINT_NAME.match(d.name) else d
        runs.setdefault(run, []).append(d)
    if not runs:
        return None

    def written(d: Path) -> float:
        return (d / "config.json").stat().st_mtime

    run = max(runs, key=lambda r: max(written(d) for d in runs[r]))
    if run in runs[run]:
        return str(run)
    return str(max(runs[run], key=lambda d: int(CHECKPOINT_NAME.match(d.name).group(1))))


def resolve_model(model: str | None, runs_dir: str | os.PathLike = "runs") -> str:
    """`model` if given (a directory or a Hub id), else the newest model under `runs_dir`; a clear error if none."""
    if model:
        if os.path.isdir(model) and not is_model_dir(model):
            hint = newest_model(model)
            raise ModelNotFoundError(f"{model} is not a model directory (no config.json + model.safetensors)"
                                     + (f"; its newest model is {hint}" if hint else ""))
        return model
    found = newest_model(runs_dir)
    if found is None:
        raise ModelNotFoundError(
            f"no trained model under {os.path.abspath(runs_dir)}: pass --model DIR_OR_HUB_ID, train one "
            "(accelerate launch recipes/pretrain.py --depth N, see the README) or convert a nanochat checkpoint "
            "(python -m modeling_nanochat.checkpoints.convert --input-dir ... --output-dir runs/NAME)")
    return found


def check_model_dir(path: str | os.PathLike) -> dict:
    """Raise ValueError naming everything a loadable, shareable model directory lacks; return its config.json."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{p} is not a directory")
    problems = []
    config = {}
    if not (p / "config.json").is_file():
        problems.append("config.json (the model config)")
    else:
        try:
            config = json.loads((p / "config.json").read_text())
        except ValueError as e:
            problems.append(f"a readable config.json ({e})")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        problems += [f"weight shard {s} (listed in model.safetensors.index.json)" for s in shards
                     if not (p / s).is_file()]
    elif not (p / "model.safetensors").is_file():
        problems.append("model.safetensors (the weights; re-save with save_pretrained, which writes safetensors)")
    problems += [f"{t} (the tokenizer; save it with modeling_nanochat.tokenizer.tokenizer.save_tokenizer)"
                 for t in TOKENIZER_FILES if not (p / t).is_file()]
    for cls in (config.get("auto_map") or {}).values():
        module_file = cls.split("--")[-1].split(".")[0] + ".py"
        if not (p / module_file).is_file():
            problems.append(f"{module_file} (remote code named in config.json's auto_map)")
    if problems:
        hint = ""
        if not is_model_dir(p) and (newest := newest_model(p)):
            hint = f"\n{p} looks like a run directory without a final model; its newest checkpoint is {newest}"
        raise ValueError(f"{p} is missing: " + "; ".join(dict.fromkeys(problems)) + hint)
    return config


# ----------------------------------------------------------------------------------------------------------------
# Loading with errors a user can act on. transformers' own errors for a broken local directory are raw library
# tracebacks (safetensors' "incomplete metadata", "Repo id must be in the form ..." for a mistyped path); these
# checks run first and name the file and the fix. They read only headers, so they cost nothing next to loading.


def looks_like_path(name: str) -> bool:
    """True when `name` can only mean a local directory: absolute, ./ ~ .., more than one '/', or its first
    component exists here (runs/nope). Such a name is never sent to the Hub as a repo id."""
    name = str(name)
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return True
    return "/" in name and os.path.isdir(name.split("/", 1)[0])


def check_weights(path: str | os.PathLike) -> None:
    """Raise CheckpointError when a safetensors file (or a shard of an index) is missing, truncated or corrupt."""
    from safetensors import safe_open

    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})",
                                  "re-save the model with save_pretrained") from None
    else:
        shards = ["model.safetensors"]
    for shard in shards:
        f = p / shard
        if not f.is_file():
            raise CheckpointError(f"{f} is missing", "re-save the model with save_pretrained, or copy the file again")
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) for a bad file
            raise CheckpointError(
                f"{f} is truncated or corrupt ({e}; {f.stat().st_size:,} bytes on disk)",
                "copy or download it again, or load an earlier checkpoint (checkpoint-*/ of the same run)") from None


def load_config(path: str | os.PathLike, **kwargs):
    """AutoConfig of a local model directory; a missing, unreadable or inconsistent config.json is a CheckpointError
    naming the file (a wrong field's message comes from NanoChatConfig's own checks)."""
    from transformers import AutoConfig

    import modeling_nanochat  # noqa: F401 - registers nanochat_hf with the Auto classes

    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path} has no config.json", "point at a directory written by save_pretrained")
    try:
        fields = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({e})", "restore it from the checkpoint it came from") from None
    if not isinstance(fields, dict) or "model_type" not in fields:
        # transformers would fall back to auto_map and ask for trust_remote_code, hiding what is wrong
        from modeling_nanochat.configuration_nanochat import NanoChatConfig
        raise CheckpointError(f"{f} has no model_type", f'add "model_type": "{NanoChatConfig.model_type}" (the '
                              "type of this project's models) or restore the file from the checkpoint it came from")
    try:
        return AutoConfig.from_pretrained(str(path), **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{f}: {e}", "correct that field (the depth dial's values are in "
                              "`python recipes/pretrain.py --depth N --print-plan`) or re-save the model") from None


def check_local_model(name: str | os.PathLike) -> str:
    """Validate `name` when it is (or can only be) a local model directory; return it unchanged. A Hub id passes."""
    name = str(name)
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise CheckpointError(f"{name} is a file, not a model directory", "pass the directory that holds it")
        if not is_model_dir(name):
            hint = newest_model(name)
            raise CheckpointError(f"{name} is not a model directory (no config.json + model.safetensors)",
                                  f"its newest model is {hint}" if hint else
                                  "point at a directory written by save_pretrained (a run's output or checkpoint-*)")
        load_config(name)
        check_weights(name)
        return name
    if looks_like_path(name):
        parent = os.path.dirname(os.path.abspath(os.path.expanduser(name)))
        near = newest_model(parent) if os.path.isdir(parent) else None
        raise CheckpointError(f"no such directory: {name}", f"the newest model under {parent} is {near}" if near
                              else "check the path (it is not sent to the Hub: it names a local folder)")
    return name


def load_model(name: str | os.PathLike, cls=None, **kwargs):
    """`cls.from_pretrained(name, **kwargs)` (default AutoModelForCausalLM) after `check_local_model`; a Hub id that
    cannot be fetched is a CheckpointError saying so."""
    from transformers import AutoModelForCausalLM

    import modeling_nanochat  # noqa: F401 - registers nanochat_hf with the Auto classes

    name = check_local_model(name)
    try:
        return (cls or AutoModelForCausalLM).from_pretrained(name, **kwargs)
    except OSError as e:
        if os.path.isdir(name):
            raise
        # `runs/nope` reads as a Hub repo id too when ./runs does not exist: say "no such directory" first
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"no such directory: {name}; read as a Hub repo id it could not be loaded either "
                              f"({reason})", "check the path; for a Hub model check the spelling, your network "
                              "and HF_TOKEN") from None


def check_tokenizer_matches(tokenizer, config, where: str = "the tokenizer") -> None:
    """A tokenizer from another model shifts every id: refuse one with more tokens than the model's vocabulary or
    a different <|bos|> id (nanochat's documents and conversations all start with it)."""
    n = len(tokenizer)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and n > vocab:
        raise CheckpointError(f"{where} has {n:,} tokens but the model's vocabulary has {vocab:,}",
                              "use the tokenizer saved with this model (omit --tokenizer)")
    bos = getattr(config, "bos_token_id", None)
    got = tokenizer.convert_tokens_to_ids("<|bos|>") if "<|bos|>" in tokenizer.get_vocab() else None
    if bos is not None and got is not None and got != bos:
        raise CheckpointError(f"{where} puts <|bos|> at id {got}, the model expects {bos}: it belongs to another model",
                              "use the tokenizer saved with this model (omit --tokenizer)")


def load_model_tokenizer(name: str | os.PathLike, config=None, **kwargs):
    """AutoTokenizer of `name` with the same path checks as `load_model`, checked against `config` when given."""
    from transformers import AutoTokenizer

    name = str(name)
    if os.path.isdir(name):
        missing = [t for t in TOKENIZER_FILES if not os.path.isfile(os.path.join(name, t))]
        if missing:
            raise CheckpointError(f"{name} has no tokenizer ({', '.join(missing)} missing)",
                                  "pass --tokenizer DIR, or save one there with modeling_nanochat.tokenizer."
                                  "tokenizer.save_tokenizer")
    elif looks_like_path(name) or os.path.exists(name):
        raise CheckpointError(f"no such tokenizer directory: {name}", "check the path")
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load a tokenizer from {name} ({e})",
                              "pass the model's own directory or --tokenizer DIR") from None
    if config is not None:
        check_tokenizer_matches(tok, config, where=f"the tokenizer in {name}")
    return tok


__all__ = ["WEIGHT_FILES", "TOKENIZER_FILES", "is_model_dir", "newest_model", "resolve_model", "check_model_dir",
           "looks_like_path", "check_weights", "load_config", "check_local_model", "load_model", "load_model_tokenizer",
           "check_tokenizer_matches"]
