"""Evaluate a base model the way nanochat's base_eval does: greedy samples, train/val bits per byte, CORE.

    python recipes/base_eval.py --model runs/d24 --output runs/d24/base_eval.json
    accelerate launch recipes/base_eval.py --model runs/d24 ...            # bpb and CORE split over the processes
    python recipes/base_eval.py --model DIR --core synth-core=DATA/core --core core-sample=../shared/data/core_sample

--data defaults to the data the model was pretrained on (its run_config.json). Each --core NAME=DIR scores one eval
bundle (default: nanochat's CORE bundle, downloaded when absent). The JSON holds {"bpb": {"train", "val"},
"core": {NAME: evaluate_core's result}, "samples": [...]} and a markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base model dir (recipes/pretrain.py output)")
    ap.add_argument("--data", default=None, help="text for bpb (default: the model's pretraining data)")
    ap.add_argument("--bpb-tokens", type=int, default=40 * 2**19,
                    help="tokens per split for bpb (nanochat: 40 x 524,288); rounded down to whole batches")
    ap.add_argument("--device-batch-size", type=int, default=16, help="rows per forward for bpb")
    ap.add_argument("--core", action="append", default=[], metavar="NAME=DIR",
                    help="an eval bundle to score (repeatable); DIR 'default' = nanochat's bundle (downloaded)")
    ap.add_argument("--core-max-per-task", type=int, default=-1, help="examples per CORE task (-1: all)")
    ap.add_argument("--no-core", action="store_true", help="skip CORE")
    ap.add_argument("--prompt", action="append", default=None, help="sample prompt (repeatable; default: "
                                                                    "nanochat's)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    return ap.parse_args(argv)


def pretraining_data(model_dir: str) -> str | None:
    """The --data the model was pretrained with, from its run_config.json (None: nanochat's default)."""
    path = os.path.join(model_dir, "run_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        cfg = json.load(f)
    return (cfg.get("args") or {}).get("data")


def main(argv=None) -> dict:
    from modeling_nanochat.utils.errors import cli_run

    return cli_run(_main, argv)


def _main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    import modeling_nanochat  # noqa: F401 - registers the model type
    from evaluation.bpb import evaluate_bpb
    from evaluation.core import evaluate_core, format_table
    from evaluation.samples import SAMPLE_PROMPTS, greedy_completions
    from modeling_nanochat.data.loader import PretrainLoader, resolve_data
    from modeling_nanochat.checkpoints.model_dirs import load_model, load_model_tokenizer
    from modeling_nanochat.tokenizer.tokenizer import token_bytes_of
    from modeling_nanochat.utils.errors import NanochatError
    from modeling_nanochat.utils.io import atomic_write

    cores = {}
    for spec in ([] if args.no_core else args.core or ["core=default"]):
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise NanochatError(f"--core takes NAME=DIR (e.g. core=default or synth=runs/tiny/data/core), "
                                f"got {spec!r}")
        cores[name] = None if path == "default" else path
    state = PartialState(cpu=not torch.cuda.is_available())
    device, rank, world = state.device, state.process_index, state.num_processes
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if device.type == "cuda" else None
    model = load_model(args.model, AutoModelForCausalLM).to(device).eval()
    tokenizer = load_model_tokenizer(args.model, config=model.config)
    token_bytes = token_bytes_of(args.model, tokenizer)
    seq_len = model.config.max_position_embeddings
    source = resolve_data(args.data or pretraining_data(args.model))
    out = {"model": os.path.abspath(args.model), "world_size": world, "bpb": {}, "core": {}, "samples": []}

    steps = max(1, args.bpb_tokens // (args.device_batch_size * seq_len * world))
    for split in ("train", "val"):
        loader = PretrainLoader(source, tokenizer, batch_size=args.device_batch_size, seq_len=seq_len, split=split,
                                rank=rank, world_size=world)
        out["bpb"][split] = evaluate_bpb(model, loader, steps, token_bytes, autocast=autocast)
        if rank == 0:
            print(f"{split} bpb: {out['bpb'][split]:.6f}", flush=True)
    for name, bundle in cores.items():
        result = evaluate_core(model, tokenizer, bundle, max_per_task=args.core_max_per_task, device=device)
        out["core"][name] = result
        if rank == 0:
            print(f"\n{name}: CORE {result['core']:.4f}\n{format_table(result)}", flush=True)
    if rank == 0:
        prompts = args.prompt or list(SAMPLE_PROMPTS)
        texts = greedy_completions(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                   autocast=autocast or __import__("contextlib").nullcontext)
        out["samples"] = [{"prompt": p, "text": t} for p, t in zip(prompts, texts)]
        print("\nsamples:\n" + "\n".join(f"  {t!r}" for t in texts))
        if args.output:
            atomic_write(args.output, json.dumps(out, indent=2))
    state.wait_for_everyone()
    return out


if __name__ == "__main__":
    main()
