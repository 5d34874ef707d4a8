"""Faithful MuonAdamW (DDP-style, nanochat's optimizer) vs DeepSpeed ZeRO-2 with DeepSpeed's Muon (and AdamW):
val bits-per-byte at equal tokens, same model, data, batch and schedule. Prints one JSON line on stdout.

    python bench/optimizer_paths.py                               # small CPU run on ../shared/data/text_sample.txt
    python bench/optimizer_paths.py --data DIR --tokenizer DIR --depth 4 --max-seq-len 256 --steps 200 --gpu

Every path is a real 2-process `accelerate launch` of recipes/pretrain.py (on CPU: gloo; with --gpu: the
single-node configs with --num-processes GPUs). On CPU the default is a 2-layer model; the number is a sanity
check of the trade-off, not a scaling result.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PATHS = {  # name: (accelerate config on CPU, pretrain --optimizer)
    "muonadamw": ("cpu.yaml", "muonadamw"),
    "deepspeed_muon": ("cpu_zero2.yaml", "muon"),
    "deepspeed_adamw": ("cpu_zero2.yaml", "adamw"),
}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "text_sample.txt"))
    p.add_argument("--tokenizer", default=None, help="default: the committed vocab-4096 nanochat fixture tokenizer")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--device-batch-size", type=int, default=4)
    p.add_argument("--total-batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr-scale", type=float, default=8.0, help="multiplies the CLI LRs (the dial scales them by "
                                                               "sqrt(batch/2^19), tiny at CPU batch sizes)")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    p.add_argument("--gpu", action="store_true", help="use the GPU configs (single_gpu / zero2_8gpu) instead")
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
    args = p.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="optim-paths-"))
    tok = args.tokenizer
    if tok is None:
        from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer, save_tokenizer
        tok = str(work / "tokenizer")
        save_tokenizer(convert_nanochat_tokenizer(str(REPO / "tests" / "fixtures" / "nanochat_tokenizer_4k")), tok)
    s = args.lr_scale
    flags = ["--depth", str(args.depth), "--aspect-ratio", str(args.aspect_ratio), "--head-dim", str(args.head_dim),
             "--max-seq-len", str(args.max_seq_len), "--device-batch-size", str(args.device_batch_size),
             "--total-batch-size", str(args.total_batch_size), "--num-iterations", str(args.steps),
             "--embedding-lr", str(0.3 * s), "--unembedding-lr", str(0.008 * s), "--matrix-lr", str(0.02 * s),
             "--scalar-lr", str(0.5 * s), "--warmup-steps", "5", "--eval-every", str(args.steps),
             "--eval-tokens", str(args.eval_tokens), "--core-every", "-1", "--sample-every", "-1",
             "--tokenizer", tok, "--data", args.data, "--overwrite"]
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), PYTHONPATH=str(REPO))
    if not args.gpu:
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TORCH_COMPILE_DISABLE="1")
    results = {}
    for name in args.paths.split(","):
        cfg, optimizer = PATHS[name]
        if args.gpu:
            cfg = "single_gpu.yaml" if name == "muonadamw" and args.num_processes == 1 else \
                  ("ddp_8gpu.yaml" if name == "muonadamw" else "zero2_8gpu.yaml")
        run_env = dict(env, ACCELERATE_USE_CPU="1") if (name == "muonadamw" and not args.gpu) else env
        out = work / name
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / cfg), "--num_processes", str(args.num_processes),
               "--main_process_port", str(_port()), str(REPO / "recipes" / "pretrain.py"), *flags,
               "--optimizer", optimizer, "--output-dir", str(out)]
        print(f"[{name}] {' '.join(cmd[3:6])} ...", file=sys.stderr, flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if "loss" in r]
        val = [r["val_bpb"] for r in rows if "val_bpb" in r]
        tps = sorted(r["tok_per_s"] for r in train[3:]) or [0]
        results[name] = {"val_bpb": val[-1], "val_bpb_start": val[0], "final_loss": train[-1]["smooth_loss"],
                         "tokens": args.total_batch_size * args.steps, "median_tok_per_s": tps[len(tps) // 2],
                         "wall_s": round(time.time() - t0, 1)}
        print(f"[{name}] {results[name]}", file=sys.stderr, flush=True)
    print(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "workdir"}, "results": results}))


if __name__ == "__main__":
    main()
