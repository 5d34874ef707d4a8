"""The compression lab: quantize a trained model every way this machine supports, add distilled and pruned
variants, measure them all the same way, and write compression.md + compression.png.

    python recipes/compress.py --model runs/speedrun-tiny/sft --output-dir runs/speedrun-tiny/compression \\
        --val-data runs/speedrun-tiny/data/pretrain --core runs/speedrun-tiny/data/core \\
        --chat-data runs/speedrun-tiny/data/chat_eval --variant distilled-d2=runs/x/sft:distilled \\
        --base-variant teacher-d4=runs/speedrun-tiny/base:fp32 --base-variant pruned-d3=runs/pruned/healed:pruned

For each variant: parameters, bytes on disk, peak memory (fresh process), prefill and decode tok/s at batch 1 and 8
(medians of --repeats interleaved rounds), val bits per byte, CORE, synth-chat and synth-arith accuracy, and whether
it is on the Pareto front of quality against size and against latency. A method this machine cannot run is one
line in the report, marked n/a. Quantized checkpoints are kept under OUTPUT/variants/<method> (they load with
`from_pretrained`). The speedrun runs this as its `compress` stage (tiny preset), with students distilled and
pruned from its own base model (recipes/distill.py, recipes/prune.py).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None):
    from modeling_nanochat.compression.quantize import METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model to compress (fp32 reference row)")
    p.add_argument("--output-dir", required=True, help="gets compression.{md,png,json} and variants/")
    p.add_argument("--methods", default="all", help=f"comma list of quantization methods or 'all' ({', '.join(METHODS)})"
                                                    " or 'none'")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=DIR[:KIND]",
                   help="another model to measure beside the quantized ones (a distilled student, a pruned model); "
                        "repeatable")
    p.add_argument("--base-variant", action="append", default=[], metavar="NAME=DIR[:KIND]",
                   help="a base model, compared in a table of its own (a distilled or pruned base model, the "
                        "unpruned teacher); repeatable")
    p.add_argument("--keep-ablation", default="torchao-int8-wo",
                   help="also measure this method with every Linear quantized (justifies the default of what stays "
                        "in high precision); 'none' to skip")
    p.add_argument("--val-data", default=None, help="pretraining data dir for val bits per byte")
    p.add_argument("--val-tokens", type=int, default=65536)
    p.add_argument("--core", default=None, help="CORE bundle dir (offline: the synthetic one)")
    p.add_argument("--core-max-per-task", type=int, default=100)
    p.add_argument("--chat-data", default=None, help="dir with synth_chat.jsonl / gsm8k.jsonl (synthetic chat tasks)")
    p.add_argument("--chat-limit", type=int, default=100, help="problems per chat task")
    p.add_argument("--repeats", type=int, default=3, help="interleaved speed rounds (medians)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    args = p.parse_args(argv)
    if args.methods == "all":
        args.methods = list(METHODS)
    elif args.methods == "none":
        args.methods = []
    else:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return args


def main(argv=None):
    from modeling_nanochat.utils.errors import cli_run

    return cli_run(_main, argv)


def _main(argv=None) -> dict:
    args = parse_args(argv)
    from modeling_nanochat.compression.lab import extra_variant, run_lab

    report = run_lab(args.model, args.output_dir, methods=args.methods,
                     extra=[extra_variant(s) for s in args.variant] +
                           [extra_variant(s, group="base") for s in args.base_variant],
                     keep_ablation=None if args.keep_ablation == "none" else args.keep_ablation,
                     val_data=args.val_data, val_tokens=args.val_tokens, core_bundle=args.core,
                     core_max_per_task=args.core_max_per_task, chat_data=args.chat_data, chat_limit=args.chat_limit,
                     repeats=args.repeats, memory=not args.no_memory, say=lambda m: print(m, flush=True))
    print("\n" + report["markdown"])
    return report


if __name__ == "__main__":
    main()
