"""Pretrain a nanochat base model. One dial: --depth sets the model and, by nanochat's rules, the token budget,
batch size, learning rates, weight decay and schedules (see `modeling_nanochat/optim/scaling.py`); every derived value can
be overridden.

    accelerate launch recipes/pretrain.py --depth 20 --tokenizer runs/tokenizer --output-dir runs/d20
    accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml recipes/pretrain.py --depth 24 ...
    python recipes/pretrain.py --depth 4 --print-plan            # just show what the dial derives

On CPU, 2 processes must be started like this (`accelerate launch --cpu` silently starts ONE):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --main_process_port 29533 recipes/pretrain.py ...     (or --config_file accelerate_configs/cpu.yaml)

Output dir: run_config.json (world size, resolved plan, flags), metrics.jsonl (one JSON object per step),
checkpoint-<step>/ (HF model + exact training state), and the final model at the root (`from_pretrained(dir)`).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("model (the dial)")
    a.add_argument("--depth", type=int, default=20, help="number of transformer blocks; sizes everything else")
    a.add_argument("--aspect-ratio", type=int, default=64, help="model width = depth x aspect ratio, rounded up to "
                                                                "a multiple of --head-dim")
    a.add_argument("--head-dim", type=int, default=128, help="attention head size")
    a.add_argument("--max-seq-len", type=int, default=2048, help="training context length T")
    a.add_argument("--window-pattern", default="SSSL", help="per-layer attention windows tiled over the layers: "
                                                            "S = short (T/4 rounded up to 128), L = full; last layer L")
    h = p.add_argument_group("horizon (first one given wins)")
    h.add_argument("--num-iterations", type=int, default=-1, help="explicit optimizer steps (-1: derive)")
    h.add_argument("--target-flops", type=float, default=-1.0, help="train for this many FLOPs (-1: off)")
    h.add_argument("--target-param-data-ratio", type=float, default=12,
                   help="tokens = ratio x scaling params (block matrices + lm_head); default 12")
    o = p.add_argument_group("optimization")
    o.add_argument("--device-batch-size", type=int, default=32, help="rows of T tokens per process per micro-step; "
                                                                     "lower it (16, 8, ...) if you run out of memory")
    o.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1: Power-Lines rule)")
    o.add_argument("--embedding-lr", type=float, default=0.3, help="AdamW LR of the token embedding (before scaling)")
    o.add_argument("--unembedding-lr", type=float, default=0.008, help="AdamW LR of lm_head (before scaling)")
    o.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices (before scaling)")
    o.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW LR of the residual scalars (before scaling)")
    o.add_argument("--weight-decay", type=float, default=0.28, help="Muon weight decay at d12 (scaled by the dial)")
    o.add_argument("--warmup-steps", type=int, default=40)
    o.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of steps in the final LR warmdown")
    o.add_argument("--final-lr-frac", type=float, default=0.05, help="LR multiplier at the end of the warmdown")
    o.add_argument("--optimizer", default=None, choices=["muonadamw", "muon", "adamw"],
                   help="muonadamw: nanochat's optimizer (the default; not under DeepSpeed). Under a DeepSpeed "
                        "accelerate config: muon (DeepSpeed's Muon, the default there) or adamw")
    d = p.add_argument_group("data and output")
    d.add_argument("--tokenizer", help="tokenizer dir (recipes/tokenizer.py output); taken from the checkpoint on --resume")
    d.add_argument("--data", default=None, help="climbmix (default), fineweb-edu, a dir of parquet shards, a "
                                                "jsonl/txt/parquet file or a Hub dataset id")
    d.add_argument("--num-shards", type=int, default=None, help="climbmix/fineweb-edu: train on shards 0..N-1 "
                   "(downloaded if missing, plus the val shard); default: every shard already downloaded")
    d.add_argument("--output-dir", default=None, help="default runs/d<depth> (runs/d<depth>-distilled with --teacher)")
    d.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --output-dir "
                                                         "(starts fresh if there is none)")
    d.add_argument("--overwrite", action="store_true", help="start over in a non-empty --output-dir")
    d.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
    d.add_argument("--keep-last", type=int, default=-1, help="keep only the newest N checkpoints (-1: all)")
    d.add_argument("--seed", type=int, default=42)
    k = p.add_argument_group("distillation and initialization (recipes/distill.py, recipes/prune.py)")
    k.add_argument("--teacher", default=None, help="a model dir to distill from: the loss becomes --kd-alpha x "
                   "T^2 KL(teacher || student) at temperature T + (1 - --kd-alpha) x the text's cross-entropy "
                   "(modeling_nanochat/pretrain/distill.py); same tokenizer required")
    k.add_argument("--kd-temperature", type=float, default=1.0, help="softening temperature T of both distributions")
    k.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the distillation term (1 = teacher only)")
    k.add_argument("--init-from", default=None, help="start from this model dir's weights AND architecture (e.g. a "
                   "depth-pruned model to heal): --depth/--aspect-ratio/--head-dim/--window-pattern/--max-seq-len "
                   "are taken from its config.json")
    e = p.add_argument_group("evaluation and logging")
    e.add_argument("--eval-every", type=int, default=250, help="val bits-per-byte every N steps (-1: off)")
    e.add_argument("--eval-tokens", type=int, default=80 * 524288, help="tokens per val bpb evaluation")
    e.add_argument("--core-every", type=int, default=2000, help="CORE metric every N steps and at the end (-1: off)")
    e.add_argument("--core-max-per-task", type=int, default=500, help="examples per CORE task during training")
    e.add_argument("--core-bundle", default=None, help="CORE eval bundle dir (default: download nanochat's)")
    e.add_argument("--sample-every", type=int, default=2000, help="print greedy samples every N steps (-1: off)")
    e.add_argument("--log-every", type=int, default=1, help="tracker logging interval (metrics.jsonl gets every step)")
    e.add_argument("--report-to", default="none", choices=["none", "tensorboard", "wandb", "trackio"])
    e.add_argument("--run-name", default=None, help="tracker run name (default: the output dir's name)")
    r = p.add_argument_group("runtime")
    r.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="compute dtype: auto = bf16 autocast on CUDA, fp32 elsewhere (bf16 is ~400x slower on CPU)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on GPU only)")
    r.add_argument("--compile-optimizer", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile MuonAdamW's update functions as nanochat does (auto: on with CUDA or --compile)")
    r.add_argument("--fp8", action="store_true", help="fp8 matmuls via torchao (CUDA, compute capability >= 8.9)")
    r.add_argument("--print-plan", action="store_true", help="print the derived plan as JSON and exit")
    r.add_argument("--vocab-size", type=int, default=32768,
                   help="vocabulary size for --print-plan without --tokenizer (nanochat's tokenizer: 32768)")
    return p


def main(argv=None):
    from modeling_nanochat.utils.errors import cli_run

    # a user mistake (RunError, a broken checkpoint, a full disk: NanochatError) is one line from the main process
    # and exit status 2; --debug or NANOCHAT_DEBUG=1 shows the traceback
    return cli_run(train, argv)  # the plan (--print-plan) or the trainer's summary


def train(argv, parser=None):
    """Parse `argv` with `parser` (default: this recipe's; recipes/distill.py passes its own) and run."""
    args = (parser or build_parser()).parse_args(argv)
    from modeling_nanochat.pretrain.setup import run
    from modeling_nanochat.pretrain.trainer import Interrupted

    try:
        return run(args)
    except Interrupted as e:
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    main()
