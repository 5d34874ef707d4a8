"""Training checkpoints: an HF model directory plus the state needed to continue the run exactly.

    <output-dir>/checkpoint-<step>/
        config.json, model.safetensors, configuration/modeling_nanochat.py, generation_config.json   (save_pretrained)
        tokenizer.json, tokenizer_config.json, token_bytes.pt                                           (save_tokenizer)
        training_state/
            trainer_state.json   step, loop state (EMA loss, best val bpb, training time), plan, args, world size
            optimizer.pt         the optimizer's world-size-independent state (MuonAdamW.state_dict() gathers shards)
            deepspeed/           instead of optimizer.pt under DeepSpeed: its per-rank fp32 masters and optimizer
            dataloader.pt        every rank's exact loader state (file, row group, cursor, packing buffer)

Each checkpoint directory is built under a temporary name and renamed into place when complete (`atomic_dir`), so
`checkpoint-*` directories are always whole: a run killed while saving leaves the previous checkpoint as the last
good one. Any `checkpoint-<step>` directory loads with `from_pretrained` like a final model.

Why not Accelerate's `save_state`: it keeps only rank 0's optimizer, which silently corrupts a sharded optimizer
state on resume, and it does not know our data loader's packing buffer. Model weights still go through
`save_pretrained` (safetensors) so every checkpoint is a normal HF model.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import torch

from modeling_nanochat.utils.errors import CheckpointError
from modeling_nanochat.utils.io import atomic_dir

STATE_DIR = "training_state"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # checkpoint-<step>: ours, and Trainer's


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}")


def save_checkpoint(path: str, *, model, tokenizer, optimizer_state: dict, loader_states: list,
                    trainer_state: dict, handover=None) -> str:
    """Write one complete checkpoint directory atomically (call on the main process only); `handover` (a
    checkpoints.handover.PretrainHandover) is what the chat stages inherit."""
    from modeling_nanochat.tokenizer.tokenizer import save_tokenizer

    with atomic_dir(path, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        state_dir = os.path.join(tmp, STATE_DIR)
        os.makedirs(state_dir)
        torch.save(optimizer_state, os.path.join(state_dir, "optimizer.pt"))
        torch.save({"world_size": len(loader_states), "ranks": loader_states}, os.path.join(state_dir, "dataloader.pt"))
        with open(os.path.join(state_dir, "trainer_state.json"), "w") as f:
            json.dump(trainer_state, f, indent=2)
        if handover is not None:
            handover.save(state_dir)
    return path


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `output_dir`, oldest first."""
    return [(step, os.path.join(output_dir, name)) for step, name in _numbered(output_dir)
            if os.path.isfile(os.path.join(output_dir, name, STATE_DIR, "trainer_state.json"))]


def latest_checkpoint(output_dir: str) -> str | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def load_training_state(path: str) -> tuple[dict, dict, list]:
    """(trainer_state, optimizer_state, per-rank loader states) of a checkpoint directory."""
    state_dir = os.path.join(path, STATE_DIR)
    try:
        with open(os.path.join(state_dir, "trainer_state.json")) as f:
            trainer_state = json.load(f)
        opt_path = os.path.join(state_dir, "optimizer.pt")  # absent under DeepSpeed (its own shards instead)
        optimizer_state = torch.load(opt_path, map_location="cpu", weights_only=False) if os.path.exists(opt_path) else None
        loaders = torch.load(os.path.join(state_dir, "dataloader.pt"), map_location="cpu", weights_only=False)
        ranks = loaders["ranks"]
        trainer_state["loop_state"], trainer_state["plan"]  # noqa: B018 - the keys a resume reads
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})",
                              "remove (or move away) that checkpoint directory to resume from the one before it, or "
                              "start over with --overwrite") from None
    return trainer_state, optimizer_state, ranks


def prune_checkpoints(output_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (<= 0 keeps everything)."""
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# transformers Trainer checkpoints (SFT, GRPO). The Trainer writes `checkpoint-<step>` in place, so a run killed while
# saving (SIGKILL, out of memory, a full disk) leaves a partial directory; resuming from one either fails deep inside
# the Trainer or, worse, goes on: the Trainer skips an optimizer or scheduler file it does not find and continues
# with a fresh optimizer without a word. Our trainers check the checkpoint before a resume.

TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt")  # what "continues exactly" needs beside the weights


def check_trainer_checkpoint(path: str, *, with_optimizer: bool = True) -> int:
    """The step of a transformers Trainer checkpoint; CheckpointError naming what is missing or broken otherwise.
    with_optimizer=False for runs that save only the model (`save_only_model`). Under DeepSpeed (a `global_step*`
    directory inside) the engine keeps its own optimizer files and only the weights and trainer state are checked."""
    import zipfile

    if not os.path.isdir(path):
        parent = os.path.dirname(os.path.normpath(path)) or "."
        found = [name for _, name in _numbered(parent)]
        raise CheckpointError(f"{path} is not a checkpoint directory",
                              f"pass one of {', '.join(found)} (in {parent})" if found else
                              "pass a checkpoint-N directory that a run saved, or start without "
                              "--resume_from_checkpoint")
    state_file = os.path.join(path, "trainer_state.json")
    try:
        with open(state_file) as f:
            step = int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is incomplete or corrupt: trainer_state.json is unreadable "
                              f"({type(e).__name__}: {e}); was the run stopped while saving it?",
                              _resume_fix(path)) from None
    adapter = os.path.join(path, "adapter_model.safetensors")  # a LoRA run saves the adapter, not the model
    try:
        if os.path.isfile(adapter):
            from safetensors import safe_open

            with safe_open(adapter, framework="pt") as st:
                st.keys()
        else:
            from modeling_nanochat.checkpoints.model_dirs import check_weights

            check_weights(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path} is incomplete or corrupt: {e.problem}", _resume_fix(path)) from None
    except Exception as e:  # safetensors' own error type for a truncated adapter
        raise CheckpointError(f"{path} is incomplete or corrupt: {adapter} is unreadable ({e})",
                              _resume_fix(path)) from None
    deepspeed = any(n.startswith("global_step") for n in os.listdir(path))
    if with_optimizer and not deepspeed:
        missing = [n for n in TRAINER_STATE_FILES if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise CheckpointError(f"{path} is incomplete: {' and '.join(missing)} missing (was the run stopped while "
                                  "saving it?); resuming from it would continue with a fresh optimizer",
                                  _resume_fix(path))
        for name in TRAINER_STATE_FILES:  # torch.save writes a zip archive: a cut file has no central directory
            f = os.path.join(path, name)
            if not zipfile.is_zipfile(f):
                raise CheckpointError(f"{path} is incomplete or corrupt: {f} is truncated or not a torch.save "
                                      f"file ({os.path.getsize(f):,} bytes)", _resume_fix(path))
    return step


def _numbered(directory: str) -> list[tuple[int, str]]:
    """(step, name) of the checkpoint-<step> entries in `directory`, oldest first (whole or not)."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted((int(m.group(1)), name) for name in names if (m := CHECKPOINT_NAME.match(name)))


def _resume_fix(path: str) -> str:
    """Where to resume from instead: the newest earlier checkpoint of the same run, if there is one."""
    parent, name = os.path.split(os.path.normpath(path))
    m = CHECKPOINT_NAME.match(name)
    earlier = [n for step, n in _numbered(parent or ".") if m and step < int(m.group(1))]
    if earlier:
        return (f"resume from {os.path.join(parent, earlier[-1])} (the checkpoint before it), or move {path} away "
                "and start again without --resume_from_checkpoint")
    return f"move {path} away and start again without --resume_from_checkpoint"


__all__ = ["save_checkpoint", "list_checkpoints", "latest_checkpoint", "load_training_state", "prune_checkpoints",
           "checkpoint_path", "check_trainer_checkpoint", "STATE_DIR"]
