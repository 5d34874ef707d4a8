"""Assemble a pretraining run from `recipes/pretrain.py`'s flags: Accelerate, tokenizer, config, plan, model,
optimizer, data loaders, output directory, trackers; then hand over to `pretraining.Pretrainer`.

Every check that can fail (flags, output dir, batch arithmetic, data, tokenizer) runs before the model is built, so
a bad combination costs seconds, not a GPU allocation.
"""

from __future__ import annotations

import json
import os

import torch

from modeling_nanochat.utils.distributed import rank_world, world_size
from modeling_nanochat.utils.io import atomic_write
from modeling_nanochat.pretrain.trainer import Pretrainer, RunError, prepare_output_dir
from modeling_nanochat.optim.scaling import PlanError, plan_training


def _accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    if args.dtype == "bfloat16" or (args.dtype == "auto" and cuda):
        mixed = "bf16"
    else:
        mixed = "no"
    multi = world_size() > 1
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if multi and not cuda else []  # DeepSpeed on CPU needs it named
    log_with = None if args.report_to == "none" else args.report_to
    try:
        return Accelerator(mixed_precision=mixed, log_with=log_with, kwargs_handlers=kwargs,
                           project_dir=args.output_dir)
    except (ImportError, ValueError) as e:
        hint = f"; --report-to {args.report_to} needs its package (pip install {args.report_to})" if log_with else ""
        raise RunError(f"could not set up Accelerate ({e}){hint}") from e


def _broadcast_parameters(model) -> None:
    """Same seed gives the same init on every rank already; this makes it certain (and costs one collective)."""
    import torch.distributed as dist
    if rank_world()[1] > 1:
        for p in model.parameters():
            dist.broadcast(p.data, src=0)


def _apply_fp8(model, device) -> None:
    """nanochat's --fp8: tensorwise-scaled fp8 matmuls for every Linear with both dims divisible by 16 and >= 128."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise RunError("--fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper or newer)")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise RunError("--fp8 uses torchao's float8 training: pip install torchao") from e

    def keep(mod, fqn):
        return (isinstance(mod, torch.nn.Linear) and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
                and min(mod.in_features, mod.out_features) >= 128)

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                               module_filter_fn=keep)


def run(args):
    """Set up everything from the parsed flags (recipes/pretrain.py) and train; raises RunError for a user mistake
    (the entry point prints it), Interrupted after a signal's checkpoint."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # save_pretrained's per-shard bar would break up our progress bar
    init_config = _init_from_config(args)  # --init-from: the architecture flags come from that model
    args.output_dir = args.output_dir or os.path.join("runs", f"d{args.depth}" + ("-distilled" if args.teacher else ""))
    acc = _accelerator(args)
    rank, world = rank_world()  # not Accelerate's counters: they can say 1 under DeepSpeed on CPU
    is_main = rank == 0
    deepspeed = acc.distributed_type.name == "DEEPSPEED"
    if deepspeed and args.optimizer == "muonadamw":
        raise RunError("--optimizer muonadamw cannot run under DeepSpeed ZeRO: nanochat's optimizer shards its own "
                       "state, ZeRO shards it again", "use --optimizer muon (DeepSpeed's Muon, the default under "
                       "DeepSpeed) or adamw, or launch without the DeepSpeed accelerate config for MuonAdamW")
    if args.optimizer is None:  # the default: nanochat's optimizer, or DeepSpeed's Muon inside ZeRO
        args.optimizer = "muon" if deepspeed else "muonadamw"
    if not deepspeed and args.optimizer != "muonadamw":
        raise RunError(f"--optimizer {args.optimizer} is the DeepSpeed path; launch with a DeepSpeed accelerate "
                       "config (accelerate_configs/zero2_8gpu.yaml) or use --optimizer muonadamw")
    if deepspeed and (args.fp8 or args.compile):
        raise RunError("--fp8/--compile are for the MuonAdamW path; DeepSpeed has its own settings for these")
    if deepspeed and (args.teacher or args.init_from):
        raise RunError("--teacher/--init-from run on the MuonAdamW path only", "launch without the DeepSpeed "
                       "accelerate config")
    if args.teacher and not 0.0 <= args.kd_alpha <= 1.0 or args.kd_temperature <= 0:
        raise RunError(f"--kd-alpha {args.kd_alpha} / --kd-temperature {args.kd_temperature}: alpha must be in "
                       "[0, 1] and the temperature > 0")

    try:
        resume_ckpt = None if args.print_plan else prepare_output_dir(
            args.output_dir, resume=args.resume, overwrite=args.overwrite, is_main=is_main)
        # the plan needs only a vocabulary size: --print-plan works without a tokenizer (--vocab-size)
        tokenizer, token_bytes = (None, None) if args.print_plan and not args.tokenizer else \
            _load_tokenizer(args, resume_ckpt)
        config, plan = _config_and_plan(args, tokenizer, world, init_config)
    except (PlanError, ValueError) as e:  # RunError is a ValueError too: one typed error for the entry point
        raise RunError(_name_the_flag(str(e))) from e
    if args.print_plan:
        if is_main:
            print(json.dumps(plan.to_dict(), indent=2))
        return plan
    if args.core_every > 0:
        args.core_bundle = _core_bundle(args, acc)
    loader = _loaders(args, acc, tokenizer, rank, world)
    model, optimizer, train_model, engine = _model_and_optimizer(args, acc, config, plan, deepspeed)
    teacher = None
    if args.teacher:
        from modeling_nanochat.pretrain.distill import load_teacher
        teacher = load_teacher(args.teacher, student_config=config, tokenizer_dir=resume_ckpt or args.tokenizer,
                               device=acc.device)

    run_config = {"world_size": world, "distributed_type": acc.distributed_type.name, "mixed_precision":
                  acc.mixed_precision, "optimizer": args.optimizer, "device": str(acc.device), "args": vars(args),
                  "resumed_from": resume_ckpt}
    trainer = Pretrainer(accelerator=acc, model=model, tokenizer=tokenizer, optimizer=optimizer, plan=plan,
                         train_loader=loader("train"), make_val_loader=lambda: loader("val"), token_bytes=token_bytes,
                         args=args, train_model=train_model, deepspeed_engine=engine, run_config=run_config,
                         teacher=teacher)
    if resume_ckpt:
        trainer.resume_from(resume_ckpt)
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        atomic_write(os.path.join(args.output_dir, "run_config.json"),
                     json.dumps({**run_config, "plan": plan.to_dict()}, indent=2, default=str))
        _print_header(plan, run_config, resume_ckpt)
    acc.init_trackers(args.run_name or os.path.basename(os.path.abspath(args.output_dir)),
                      config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    return trainer.run()


# the config's names for what recipes/pretrain.py's flags set: an error about one names the flag too
_FLAGS = {"max_position_embeddings": "--max-seq-len", "aspect_ratio": "--aspect-ratio", "head_dim": "--head-dim",
          "window_pattern": "--window-pattern", "depth": "--depth", "vocab_size": "--vocab-size"}


def _name_the_flag(message: str) -> str:
    found = [(message.find(name), flag) for name, flag in _FLAGS.items() if name in message]
    if not found or any(flag in message for _, flag in found):
        return message
    return f"{min(found)[1]}: {message}"


def _init_from_config(args):
    """--init-from's config, with the architecture flags set from it (what the run config, resume checks and the
    header then show); None without --init-from."""
    if not args.init_from:
        return None
    from modeling_nanochat.checkpoints.model_dirs import load_config
    from modeling_nanochat.utils.errors import CheckpointError
    try:
        config = load_config(args.init_from)
    except CheckpointError as e:
        raise RunError(f"--init-from: {e.problem}", e.fix) from e
    args.depth, args.head_dim, args.max_seq_len = config.num_hidden_layers, config.head_dim, \
        config.max_position_embeddings
    args.aspect_ratio = config.aspect_ratio
    args.window_pattern = "".join("S" if t == "sliding_attention" else "L" for t in config.layer_types)
    return config


def _config_and_plan(args, tokenizer, world: int, init_config=None):
    """The model config from the depth dial and the tokenizer's special ids (or --init-from's config, checked
    against the tokenizer), and the run's plan (optim/scaling)."""
    from modeling_nanochat.configuration_nanochat import NanoChatConfig

    special = {} if tokenizer is None else dict(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|bos|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|assistant_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|bos|>"))
    if init_config is not None:
        config = init_config
        if tokenizer is not None and (len(tokenizer) != config.vocab_size or config.bos_token_id != special[
                "bos_token_id"]):
            raise RunError(f"--init-from {args.init_from} has a vocabulary of {config.vocab_size} (<|bos|> "
                           f"{config.bos_token_id}) but --tokenizer has {len(tokenizer)} (<|bos|> "
                           f"{special['bos_token_id']})", "pass the model's own dir as --tokenizer")
    else:
        config = NanoChatConfig(
            depth=args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
            max_position_embeddings=args.max_seq_len, window_pattern=args.window_pattern,
            vocab_size=len(tokenizer) if tokenizer is not None else args.vocab_size, **special)
    plan = plan_training(
        config, world_size=world, device_batch_size=args.device_batch_size,
        target_param_data_ratio=args.target_param_data_ratio, total_batch_size=args.total_batch_size,
        num_iterations=args.num_iterations, target_flops=args.target_flops, embedding_lr=args.embedding_lr,
        unembedding_lr=args.unembedding_lr, matrix_lr=args.matrix_lr, scalar_lr=args.scalar_lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, warmdown_ratio=args.warmdown_ratio,
        final_lr_frac=args.final_lr_frac)
    return config, plan


def _loaders(args, acc, tokenizer, rank: int, world: int):
    """`loader(split)`: a fresh PretrainLoader on this rank's stripe of the data (downloaded once, by rank 0)."""
    from modeling_nanochat.data.loader import PretrainLoader, resolve_data
    try:
        with acc.main_process_first():  # the main process downloads, the others then find the files
            source = resolve_data(args.data, num_shards=args.num_shards)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise RunError(str(e)) from e

    def loader(split):
        return PretrainLoader(source, tokenizer, batch_size=args.device_batch_size, seq_len=args.max_seq_len,
                              split=split, rank=rank, world_size=world)
    return loader


def _model_and_optimizer(args, acc, config, plan, deepspeed: bool):
    """(model, optimizer, the module to train, the DeepSpeed engine or None): MuonAdamW on the model as nanochat
    (no DDP wrapper), or DeepSpeed's Muon/AdamW under ZeRO."""
    from modeling_nanochat.modeling_nanochat import NanoChatForCausalLM

    torch.manual_seed(args.seed)
    # _from_config: under ZeRO-3 with zero3_init_flag, transformers builds the model inside deepspeed.zero.Init
    model = NanoChatForCausalLM._from_config(config)
    if args.init_from:  # the weights of --init-from (the same config, so every tensor has its place)
        from modeling_nanochat.checkpoints.model_dirs import load_model
        model.load_state_dict(load_model(args.init_from).state_dict(), strict=True)
    if not deepspeed:  # DeepSpeed moves and broadcasts the (possibly partitioned) parameters itself
        model.to(acc.device)
        _broadcast_parameters(model)
    if acc.device.type == "cuda":  # flash-attn3 on Hopper as nanochat runs it, else sdpa; the log says which
        from modeling_nanochat.utils.attention import use_best_attention
        attn, reason = use_best_attention(model, acc.device)
        if acc.is_main_process:
            print(f"attention: {reason}", flush=True)
    if args.fp8:
        _apply_fp8(model, acc.device)
    groups_kw = dict(unembedding_lr=plan.unembedding_lr, embedding_lr=plan.embedding_lr, matrix_lr=plan.matrix_lr,
                     scalar_lr=plan.scalar_lr, weight_decay=plan.weight_decay)
    if deepspeed:
        from modeling_nanochat.optim.zero import prepare_deepspeed
        engine, optimizer = prepare_deepspeed(acc, model, plan, optimizer=args.optimizer, **groups_kw)
        return model, optimizer, engine, engine
    from modeling_nanochat.optim.muon_adamw import MuonAdamW, build_param_groups
    bf16 = acc.mixed_precision == "bf16"
    compile_opt = args.compile_optimizer == "on" or (args.compile_optimizer == "auto" and
                                                      (args.compile or acc.device.type == "cuda"))
    optimizer = MuonAdamW(build_param_groups(model, **groups_kw), muon_compute_dtype=torch.bfloat16 if bf16 else None,
                          compile=compile_opt)
    train_model = torch.compile(model, dynamic=False) if args.compile else model
    return model, optimizer, train_model, None


def _load_tokenizer(args, resume_ckpt):
    from modeling_nanochat.tokenizer.tokenizer import load_tokenizer, token_bytes_of
    tok_dir = resume_ckpt or args.tokenizer
    if not tok_dir:
        raise RunError("--tokenizer DIR is required: train one with `python recipes/tokenizer.py --data ... "
                       "--output-dir DIR` (or convert nanochat's with --convert)")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise RunError(f"{tok_dir} has no tokenizer.json; give the output dir of recipes/tokenizer.py")
    tokenizer = load_tokenizer(tok_dir)
    if tokenizer.convert_tokens_to_ids("<|bos|>") is None or "<|bos|>" not in tokenizer.get_vocab():
        raise RunError(f"{tok_dir} is not a nanochat tokenizer (no <|bos|> token)")
    return tokenizer, token_bytes_of(tok_dir, tokenizer)


def _core_bundle(args, acc):
    try:
        from evaluation.core_bundle import ensure_bundle, load_bundle
        with acc.main_process_first():  # the main process downloads it once
            bundle = ensure_bundle(args.core_bundle)
        load_bundle(bundle)  # a corrupt bundle fails now, not after hours of training
        return str(bundle)
    except (OSError, ValueError, ImportError) as e:
        raise RunError(f"CORE evaluation (--core-every {args.core_every}) needs its eval bundle: {e}. Pass "
                       "--core-bundle DIR, or --core-every -1 to train without it") from e


def _print_header(plan, run_config, resume_ckpt):
    c = plan.param_counts
    lines = [
        f"world size {plan.world_size} ({run_config['distributed_type']}, {run_config['mixed_precision']}) | "
        f"optimizer {run_config['optimizer']}",
        f"params {c['total']:,} (scaling {plan.num_scaling_params:,}) | FLOPs/token {plan.flops_per_token:.3e}",
        f"batch {plan.total_batch_size:,} tokens = {plan.device_batch_size} x {plan.max_seq_len} x "
        f"{plan.world_size} x {plan.grad_accum_steps} accum | {plan.num_iterations:,} steps ({plan.horizon_source})"
        f" = {plan.total_tokens:,} tokens, {plan.flops_per_token * plan.total_tokens:.2e} FLOPs",
        f"LRs (x{plan.batch_lr_scale:.4f}): embedding {plan.embedding_lr:.5g} unembedding {plan.unembedding_lr:.5g} "
        f"matrix {plan.matrix_lr:.5g} scalar {plan.scalar_lr:.5g} | Muon wd {plan.weight_decay:.5g}",
    ]
    if resume_ckpt:
        lines.append(f"resuming from {resume_ckpt}")
    print("\n".join(lines), flush=True)
