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
            raise FileNotFoundError(f"{model} is not a model directory (no config.json + model.safetensors)"
                                    + (f"; its newest model is {hint}" if hint else ""))
        return model
    found = newest_model(runs_dir)
    if found is None:
        raise FileNotFoundError(
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


__all__ = ["WEIGHT_FILES", "TOKENIZER_FILES", "is_model_dir", "newest_model", "resolve_model", "check_model_dir"]
