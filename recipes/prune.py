"""Depth-prune a nanochat model, then heal it with a short pretraining run.

    python recipes/prune.py --model runs/speedrun-tiny/base --drop 1 --data runs/speedrun-tiny/data/pretrain \\
        --output-dir runs/pruned --heal-steps 60 -- --total-batch-size 4096 --device-batch-size 16 --warmup-steps 5

Each of `--drop` rounds tries removing every block but the last and drops the one whose removal raises val bits per
byte the least (`modeling_nanochat/compression/prune.py`: each kept block keeps its window and value embedding).
The pruned model is saved to OUTPUT/pruned, then healed by pretraining from its weights (`recipes/pretrain.py
--init-from`, MuonAdamW and the dial's schedules) into OUTPUT/healed; flags after `--` go to that run (batch
sizes, warmup, evaluation). OUTPUT/prune.json records the bpb of the unpruned, pruned and healed models on the same
val tokens, and each round's cost of every candidate block. `--heal-steps 0` skips healing.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model dir to prune (a base model: healing is pretraining)")
    p.add_argument("--drop", type=int, default=1, help="blocks to remove (greedy, one per round)")
    p.add_argument("--data", default=None, help="pretraining data for scoring and healing (default: the model's own, "
                                                "from its run_config.json)")
    p.add_argument("--output-dir", required=True, help="gets pruned/, healed/ and prune.json")
    p.add_argument("--eval-tokens", type=int, default=65536, help="val tokens per bpb evaluation")
    p.add_argument("--heal-steps", type=int, default=60, help="optimizer steps of the healing run (0: no healing)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    argv = list(sys.argv[1:] if argv is None else argv)
    heal_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.heal_args = heal_args
    return args


def main(argv=None):
    from modeling_nanochat.utils.errors import cli_run

    return cli_run(_main, argv)


def _main(argv=None) -> dict:
    args = parse_args(argv)
    import shutil

    import torch

    from evaluation.bpb import bpb_of_split
    from modeling_nanochat.checkpoints.model_dirs import load_model, load_model_tokenizer
    from modeling_nanochat.compression.prune import prune_depth
    from modeling_nanochat.data.sources import resolve_data
    from modeling_nanochat.tokenizer.tokenizer import TOKEN_BYTES_FILE, token_bytes_of
    from modeling_nanochat.utils.errors import NanochatError
    from modeling_nanochat.utils.io import OutputExistsError, atomic_dir, atomic_write_json
    from recipes.base_eval import pretraining_data

    out = os.path.abspath(args.output_dir)
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise OutputExistsError(f"{out} exists and is not empty", "choose another --output-dir or pass --overwrite")
    if args.overwrite and os.path.isdir(out):
        shutil.rmtree(out)
    torch.manual_seed(args.seed)
    model = load_model(args.model).eval()
    tokenizer = load_model_tokenizer(args.model, config=model.config)
    token_bytes = token_bytes_of(args.model, tokenizer)
    data = args.data or pretraining_data(args.model)
    if data is None:
        raise NanochatError(f"{args.model} has no run_config.json naming its pretraining data",
                            "pass --data (the text to score blocks on and to heal with)")
    source = resolve_data(data)

    def evaluate(m):
        return bpb_of_split(m, tokenizer, token_bytes, source, "val", tokens=args.eval_tokens)

    pruned, record = prune_depth(model, args.drop, evaluate, progress=lambda msg: print(msg, flush=True))
    record.update(model=os.path.abspath(args.model), data=data, eval_tokens=args.eval_tokens,
                  blocks=[model.config.num_hidden_layers, pruned.config.num_hidden_layers],
                  params=[sum(p.numel() for p in model.parameters()), sum(p.numel() for p in pruned.parameters())],
                  backout_layer=[model.config.backout_layer, pruned.config.backout_layer])
    with atomic_dir(os.path.join(out, "pruned")) as tmp:
        pruned.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.isfile(os.path.join(args.model, TOKEN_BYTES_FILE)):
            shutil.copy(os.path.join(args.model, TOKEN_BYTES_FILE), tmp)
    record["pruned_dir"] = os.path.join(out, "pruned")
    if args.heal_steps > 0:
        record["healed_bpb"] = _heal(args, record["pruned_dir"], os.path.join(out, "healed"), data, evaluate)
        record["healed_dir"] = os.path.join(out, "healed")
    atomic_write_json(os.path.join(out, "prune.json"), record)
    _print_summary(record)
    return record


def _heal(args, pruned_dir: str, healed_dir: str, data: str, evaluate) -> float:
    """Pretrain from the pruned weights (same optimizer and schedules as any run) and score the result."""
    from recipes.pretrain import main as pretrain_main

    from modeling_nanochat.checkpoints.model_dirs import load_model

    flags = ["--init-from", pruned_dir, "--tokenizer", pruned_dir, "--data", data, "--output-dir", healed_dir,
             "--num-iterations", str(args.heal_steps), "--seed", str(args.seed), "--core-every", "-1",
             "--sample-every", "-1"] + args.heal_args
    print(f"healing: recipes/pretrain.py {' '.join(flags)}", flush=True)
    pretrain_main(flags)
    return evaluate(load_model(healed_dir).eval())


def _print_summary(record: dict) -> None:
    rows = [("unpruned", record["blocks"][0], record["params"][0], record["unpruned_bpb"]),
            ("pruned", record["blocks"][1], record["params"][1], record["pruned_bpb"])]
    if "healed_bpb" in record:
        rows.append(("healed", record["blocks"][1], record["params"][1], record["healed_bpb"]))
    print(f"\ndropped blocks {record['dropped_blocks']} (original numbering)\n")
    print("| model | blocks | params | val bpb |\n|---|---:|---:|---:|")
    for name, blocks, params, bpb in rows:
        print(f"| {name} | {blocks} | {params:,} | {bpb:.4f} |")


if __name__ == "__main__":
    main()
