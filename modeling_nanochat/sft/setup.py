"""Assemble nanochat's chat SFT from ``recipes/sft.py``'s parsed arguments and run it.

Starting point: a pretraining run directory (``recipes/pretrain.py --output-dir``) or one of its ``checkpoint-<step>``
directories; any directory ``from_pretrained`` reads works too (then nothing is inherited and the optimizer starts
fresh). Like nanochat's chat_sft, hyperparameters left at -1 are inherited from the pretraining run (T, rows per
device, tokens per step, the AdamW/Muon base LRs), with no batch-size LR scaling, and MuonAdamW is warm-started from
the run's optimizer state when that state fits (``load_optimizer``).

Output: ``<output_dir>/`` = the final model (``save_pretrained`` + the nanochat tokenizer files), ``run_config.json``
(what was resolved and why) and ``metrics.jsonl`` (every logged line).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import asdict, dataclass

import torch

from modeling_nanochat.checkpoints.handover import HANDOVER_FILE, HandoverError, PretrainHandover
from modeling_nanochat.checkpoints.model_dirs import is_model_dir
from modeling_nanochat.checkpoints.training_state import STATE_DIR, latest_checkpoint
from modeling_nanochat.utils.io import atomic_write
from modeling_nanochat.utils.errors import NanochatError

logger = logging.getLogger(__name__)

# nanochat's chat_sft fallbacks when the base checkpoint does not say
FALLBACKS = dict(device_batch_size=32, total_batch_size=524288, embedding_lr=0.3, unembedding_lr=0.004,
                 matrix_lr=0.02)


class SFTSetupError(NanochatError):
    """A problem with the starting checkpoint, the data or the settings, found before training."""


@dataclass
class InitCheckpoint:
    """What SFT starts from: the model directory, the pretraining run's hand-over record and its optimizer state."""

    model_dir: str
    checkpoint_dir: str | None = None  # the checkpoint whose training_state/ holds the optimizer
    handover: PretrainHandover | None = None
    optimizer_file: str | None = None
    optimizer_refusal: str | None = None  # why the optimizer state cannot be used, if so


def resolve_init_checkpoint(path: str) -> InitCheckpoint:
    """Find the model, the run's settings and the optimizer state for ``path`` (see the module docstring)."""
    if not os.path.isdir(path):
        raise SFTSetupError(f"--model_name_or_path {path} is not a directory: give a pretraining run "
                            "(recipes/pretrain.py --output-dir) or a checkpoint-<step> directory inside it")
    ckpt = path if os.path.isdir(os.path.join(path, STATE_DIR)) else latest_checkpoint(path)
    model_dir = path if is_model_dir(path) else ckpt
    if model_dir is None:
        raise SFTSetupError(f"{path} holds no model (config.json + model.safetensors) and no checkpoint-<step>/")
    init = InitCheckpoint(model_dir=model_dir, checkpoint_dir=ckpt)
    if ckpt is None:
        init.optimizer_refusal = "the directory has no training state (not a pretraining run)"
        return init
    state_dir = os.path.join(ckpt, STATE_DIR)
    try:
        init.handover = handover = PretrainHandover.load(state_dir)
    except HandoverError as e:
        init.optimizer_refusal = str(e)
        return init
    if handover is None:
        init.optimizer_refusal = f"{state_dir} has no hand-over record ({HANDOVER_FILE})"
        return init
    optimizer_file = os.path.join(state_dir, "optimizer.pt")
    if os.path.isdir(os.path.join(state_dir, "deepspeed")) or handover.distributed_type == "DEEPSPEED":
        init.optimizer_refusal = (f"the run trained under DeepSpeed ZeRO with its {handover.optimizer} "
                                  "optimizer, whose state is DeepSpeed's own (per-rank shards of another optimizer)")
    elif handover.optimizer != "muonadamw":
        init.optimizer_refusal = f"the run used the {handover.optimizer!r} optimizer, not MuonAdamW"
    elif not os.path.isfile(optimizer_file):
        init.optimizer_refusal = f"{optimizer_file} is missing"
    else:
        init.optimizer_file = optimizer_file
    return init


def inherit(args, init: InitCheckpoint, model_config) -> dict:
    """Fill -1/None settings from the pretraining run (nanochat's chat_sft does the same from its meta file), else
    from nanochat's fallbacks. Returns {name: (value, where it came from)}."""
    h = init.handover or PretrainHandover(max_seq_len=None, device_batch_size=None, total_batch_size=None)
    sources = {
        "max_length": (h.max_seq_len, model_config.max_position_embeddings),
        "per_device_train_batch_size": (h.device_batch_size, FALLBACKS["device_batch_size"]),
        "total_batch_size": (h.total_batch_size, FALLBACKS["total_batch_size"]),
        "embedding_lr": (h.base_lrs.get("embedding"), FALLBACKS["embedding_lr"]),
        "unembedding_lr": (h.base_lrs.get("unembedding"), FALLBACKS["unembedding_lr"]),
        "matrix_lr": (h.base_lrs.get("matrix"), FALLBACKS["matrix_lr"]),
    }
    resolved = {}
    for name, (from_run, fallback) in sources.items():
        value = getattr(args, name)
        if value is not None and value != -1:
            resolved[name] = (value, "set")
            continue
        value, where = (from_run, "pretraining run") if from_run is not None else (fallback, "fallback")
        setattr(args, name, value)
        resolved[name] = (value, where)
    return resolved


def _check_batch(args, world: int) -> None:
    T, B = args.max_length, args.per_device_train_batch_size
    per_step = T * B * world
    if T < 1 or B < 1:
        raise SFTSetupError(f"max_length ({T}) and per_device_train_batch_size ({B}) must be >= 1")
    if args.total_batch_size % per_step:
        raise SFTSetupError(f"total_batch_size {args.total_batch_size:,} is not a multiple of max_length x "
                            f"per_device_train_batch_size x processes = {T} x {B} x {world} = {per_step:,}; change "
                            "one of them")
    args.gradient_accumulation_steps = args.total_batch_size // per_step


def _load_chatcore_tasks(args) -> dict:
    if args.eval_strategy == "no" or args.chatcore_every <= 0 or not args.chatcore_tasks:
        return {}
    from evaluation.chat import load_tasks

    try:
        with args.main_process_first(desc="ChatCORE data"):
            return load_tasks(args.chatcore_tasks, args.chatcore_data)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SFTSetupError(f"ChatCORE (chatcore_every {args.chatcore_every}) needs its tasks: {e}. Pass "
                            "--chatcore_data DIR (local files, see python -m evaluation.chat --help) or "
                            "--chatcore_every -1 to train without it") from e


def _warm_start(optimizer, init: InitCheckpoint, is_main: bool, record: dict) -> None:
    from modeling_nanochat.optim.trainer_mixin import load_optimizer_state

    reason = init.optimizer_refusal
    if reason is None:
        state = torch.load(init.optimizer_file, map_location="cpu", weights_only=False)
        reason = load_optimizer_state(optimizer, state)
    if reason is None:
        record["optimizer_state"] = f"loaded from {init.optimizer_file} (momentum buffers; LRs reset to SFT's)"
    else:
        record["optimizer_state"] = f"fresh: {reason}"
    if is_main:
        level = logging.INFO if reason is None else logging.WARNING
        logger.log(level, "MuonAdamW %s", record["optimizer_state"] if reason is None else
                   f"starts with a fresh state (slightly worse, as nanochat warns): {reason}")


def _load_model(init: InitCheckpoint, args, model_args):
    """(model, tokenizer, token_bytes, uses LoRA): fp32 master weights, with LoRA adapters when ``use_peft``."""
    from modeling_nanochat.adapters import lora
    from modeling_nanochat.modeling_nanochat import NanoChatForCausalLM
    from modeling_nanochat.tokenizer.tokenizer import load_tokenizer, token_bytes_of

    tokenizer = load_tokenizer(init.model_dir)
    token_bytes = token_bytes_of(init.model_dir, tokenizer)
    model = NanoChatForCausalLM.from_pretrained(init.model_dir, dtype=torch.float32)
    if model.config.vocab_size != len(tokenizer):
        raise SFTSetupError(f"{init.model_dir}: the model's vocabulary ({model.config.vocab_size}) does not match its "
                            f"tokenizer ({len(tokenizer)})")
    peft = bool(model_args is not None and getattr(model_args, "use_peft", False))
    if peft:
        model = lora.wrap_model(model, model_args)
    if peft and args.load_optimizer:  # the pretraining state belongs to the full weights, not to adapters
        args.load_optimizer = False
    return model, tokenizer, token_bytes, peft


def _mixtures_and_plans(args, tokenizer, world: int):
    """(train mixture, val mixture or None, train plan, val plan or None): rendered once (the main process fills
    the datasets cache, the others read it) and packed into rows as nanochat does."""
    from modeling_nanochat.sft.collator import plan_epoch, plan_stream
    from modeling_nanochat.sft.data import build_sft_mixture

    T, B = args.max_length, args.per_device_train_batch_size
    # crop at T + 1 so that every conversation fits a row (nanochat renders at 2048 whatever T is: the same for
    # its T = 2048)
    mixture_kw = dict(data_dir=args.data_dir, max_tokens=min(2048, T + 1), num_proc=args.dataset_num_proc)
    try:
        with args.main_process_first(desc="SFT mixture"):
            train = build_sft_mixture(tokenizer, "train", mmlu_epochs=args.mmlu_epochs,
                                      gsm8k_epochs=args.gsm8k_epochs, smoltalk_epochs=args.smoltalk_epochs,
                                      extra_jsonl=args.extra_jsonl, **mixture_kw)
            val = build_sft_mixture(tokenizer, "val", **mixture_kw) if args.eval_strategy != "no" else None
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # bad files, offline without data_dir, bad rows
        raise SFTSetupError(f"SFT data: {e}") from e
    logger.info("planning the packed rows of %s", train.describe())
    plan = plan_epoch(train.lengths, batch_size=B, row_capacity=T + 1, world_size=world,
                      grad_accum_steps=args.gradient_accumulation_steps, buffer_size=args.buffer_size)
    val_plan = None
    if val is not None:
        val_steps = max(1, args.eval_tokens // (B * T * world))
        val_plan = plan_stream(val.lengths, batch_size=B, row_capacity=T + 1, micro_batches=val_steps,
                               world_size=world, buffer_size=args.buffer_size)
    return train, val, plan, val_plan


def build_trainer(args, model_name_or_path: str, model_args=None):
    """Everything up to a ready ``NanoChatSFTTrainer`` (see ``run``); returns (trainer, record). ``model_args``: TRL's
    ModelConfig; with ``use_peft`` the model gets LoRA adapters (lora.py) and MuonAdamW trains only those."""
    from datasets import Dataset

    from modeling_nanochat.adapters import lora
    from modeling_nanochat.optim.schedules import sft_lr_schedule, sft_muon_momentum
    from modeling_nanochat.optim.trainer_mixin import MetricsFileCallback, MuonAdamWSetup, nanochat_param_groups
    from modeling_nanochat.sft.collator import PackedSFTCollator
    from modeling_nanochat.sft.trainer import NanoChatSFTTrainer
    from modeling_nanochat.tokenizer.tokenizer import special_token_id

    if not model_name_or_path:
        raise SFTSetupError("--model_name_or_path is required: a pretraining run directory or checkpoint")
    init = resolve_init_checkpoint(model_name_or_path)
    world, rank = args.world_size, args.process_index
    model, tokenizer, token_bytes, peft = _load_model(init, args, model_args)
    resolved = inherit(args, init, model.config)
    _check_batch(args, world)
    T = args.max_length
    if T > model.config.max_position_embeddings:
        logger.warning("max_length %d is longer than the pretraining context %d", T,
                       model.config.max_position_embeddings)
    train, val, plan, val_plan = _mixtures_and_plans(args, tokenizer, world)
    chatcore_tasks = _load_chatcore_tasks(args)

    record = {"init": init.__dict__ | {"handover": init.handover and asdict(init.handover)}, "world_size": world,
              "resolved": {k: {"value": v, "from": w} for k, (v, w) in resolved.items()},
              "gradient_accumulation_steps": args.gradient_accumulation_steps,
              "train_mixture": train.describe(), "val_mixture": val.describe() if val is not None else None,
              "steps_per_epoch": plan.micro_batches // args.gradient_accumulation_steps,
              "epoch_micro_batches": plan.epoch_micro_batches}
    setup = MuonAdamWSetup(
        param_groups=functools.partial(nanochat_param_groups, unembedding_lr=args.unembedding_lr,
                                       embedding_lr=args.embedding_lr, matrix_lr=args.matrix_lr,
                                       scalar_lr=args.scalar_lr, weight_decay=args.weight_decay,
                                       init_lr_frac=args.init_lr_frac),
        lr_schedule=sft_lr_schedule(args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac),
        muon_momentum=sft_muon_momentum, shard_optimizer=args.optimizer_sharding,
        after_create=(functools.partial(_warm_start, init=init, is_main=rank == 0, record=record)
                      if args.load_optimizer else None))
    if not args.load_optimizer:
        record["optimizer_state"] = "fresh: " + ("LoRA adapters (use_peft)" if peft else "load_optimizer is off")
    record["lora"] = lora.peft_config(model_args).to_dict() if peft else None
    collator = PackedSFTCollator(train, special_token_id(tokenizer, "<|bos|>"), T)
    rows = Dataset.from_dict({"conversations": plan.global_rows()})
    val_rows = Dataset.from_dict({"conversations": val_plan.global_rows()}) if val_plan is not None else None
    trainer = NanoChatSFTTrainer(
        model=model, args=args, data_collator=collator, train_dataset=rows, eval_dataset=val_rows,
        processing_class=tokenizer, muon_setup=setup, val_mixture=val, val_plan=val_plan, token_bytes=token_bytes,
        chatcore_tasks=chatcore_tasks, callbacks=[MetricsFileCallback(os.path.join(args.output_dir, "metrics.jsonl"))])
    return trainer, record


def run(args, model_name_or_path: str, model_args=None):
    """Train, save the final model at ``args.output_dir`` (an adapter dir under LoRA: merge it with
    ``python -m modeling_nanochat.adapters.lora merge``) and return the trainer."""
    trainer, record = build_trainer(args, model_name_or_path, model_args)
    if args.process_index == 0:
        logger.info("SFT: %s | world size %d | %d steps/epoch x %s epochs | %s", record["train_mixture"],
                    record["world_size"], record["steps_per_epoch"], args.num_train_epochs,
                    ", ".join(f"{k}={v['value']} ({v['from']})" for k, v in record["resolved"].items()))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    if trainer.args.should_save:
        record["global_step"] = trainer.state.global_step
        atomic_write(os.path.join(args.output_dir, "run_config.json"), json.dumps(record, indent=2, default=str))
    trainer.accelerator.wait_for_everyone()
    return trainer


__all__ = ["InitCheckpoint", "resolve_init_checkpoint", "inherit", "build_trainer", "run", "SFTSetupError",
           "FALLBACKS"]
