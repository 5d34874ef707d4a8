"""Pretraining throughput: tokens/s and MFU of one full training step, printed as one line of JSON on stdout.

    python bench/pretrain_throughput.py --depth 12 --max-seq-len 2048 --device-batch-size 32 --steps 20
    python bench/pretrain_throughput.py --depth 4 --head-dim 64 --max-seq-len 256 --device-batch-size 4 \\
        --vocab-size 8192 --steps 10 --rounds 3 --nanochat-dir ~/src/nanochat      # also time nanochat itself

A step is what pretraining repeats: forward + loss + backward + optimizer step + zero_grad, on random token batches
[B, T] (a fresh batch per step, the same sequence from --seed for every model). Ours = NanoChatForCausalLM
initialised as for training, loss through `model(input_ids=x, labels=y, shift_labels=y)` (y is already shifted,
like nanochat's targets; `labels` only switches the loss on), and optim.MuonAdamW over optim.build_param_groups.
With --nanochat-dir, nanochat's own GPT is imported from that checkout at run time (never copied), built as its
base_train.py does (meta device -> to_empty -> init_weights) with the same sizes, and trained with
`loss = model(x, y)` and its `setup_optimizer()` MuonAdamW. Both sides get the same --compile choice for the model.
nanochat always compiles its optimizer's update functions (torch.compile decorators in its optim.py); ours does the
same unless --compile-optimizer off.

Precision, each codebase's default: on CPU fp32 everywhere (nanochat gets NANOCHAT_DTYPE=float32); on CUDA ours runs
under torch.autocast(bf16) with fp32 weights (what Accelerate's bf16 mixed precision does) and Muon's Polar Express
in bf16; nanochat picks its COMPUTE_DTYPE itself (bf16 on Ampere+; embeddings stored in bf16, Linear casts weights).

Timing: --warmup steps per model are run first and excluded (compilation, allocator warm-up), then --rounds rounds of
--steps timed steps, alternating the models (ABBA order) so that drift in a shared machine's load hits both alike.
Every step ends with a device synchronize. tok_per_s is the median over rounds of B*T*steps / time; "ratio" is the
median of the per-round ratios ours / nanochat. MFU = flops_per_token (scaling.flops_per_token, nanochat's
estimate_flops) * tok_per_s / the device's peak bf16 FLOP/s (scaling.peak_flops); null on CPU or unknown GPUs.
peak_mem_gib (CUDA only) is each model's own peak allocation during its timed steps, the other model's resident
weights and optimizer state subtracted. Progress goes to stderr, one line per step; stdout carries only the JSON.
On a shared CPU, other jobs' threads make every multi-threaded op wait (2 threads on a loaded 2-core machine ran 4-10x
slower than 1): the JSON records the 1-minute load average at start and end; compare within one run.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM  # noqa: E402
from modeling_nanochat.optim.muon_adamw import MuonAdamW, build_param_groups  # noqa: E402
from modeling_nanochat.optim.scaling import flops_per_token, peak_flops  # noqa: E402

GIB = 2**30


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Trainee:
    """One model + optimizer behind a `step(x, y) -> loss` callable, and what it holds in memory between steps."""

    def __init__(self, name, step, num_params, detail):
        self.name, self.step, self.num_params, self.detail = name, step, num_params, detail
        self.resident_bytes = 0  # weights + optimizer state, measured after warm-up (CUDA only)
        self.round_tok_per_s, self.step_s, self.losses, self.peak_bytes = [], [], [], 0


def build_ours(config, device, compile_model, compile_optimizer, convert=None):
    """`convert(model, device)`, when given, rewrites the model before the optimizer sees its parameters (fp8)."""
    model = NanoChatForCausalLM(config).to(device).train()  # post_init applies nanochat's init rules
    if convert is not None:
        convert(model, device)
    cuda = device.type == "cuda"
    optimizer = MuonAdamW(build_param_groups(model), compile=compile_optimizer,
                          muon_compute_dtype=torch.bfloat16 if cuda else None)
    fwd = torch.compile(model, dynamic=False) if compile_model else model

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = fwd(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss

    n = sum(p.numel() for p in model.parameters())
    return Trainee("ours", step, n, {"attn_implementation": config._attn_implementation,
                                     "optimizer_compiled": compile_optimizer,
                                     "autocast": "bf16" if cuda else None})


def import_nanochat(path, device):
    """nanochat's gpt module from a user's checkout. Its compute dtype is fixed at import, so set it first."""
    root = Path(path).expanduser().resolve()
    if not (root / "nanochat" / "gpt.py").is_file():
        raise SystemExit(f"--nanochat-dir {path}: no nanochat/gpt.py under it; pass the root of a karpathy/nanochat "
                         "checkout (git clone https://github.com/karpathy/nanochat)")
    if device.type == "cpu":
        if os.environ.get("NANOCHAT_DTYPE", "float32") != "float32":
            log(f"NANOCHAT_DTYPE={os.environ['NANOCHAT_DTYPE']} overridden to float32: ours runs fp32 on CPU")
        os.environ["NANOCHAT_DTYPE"] = "float32"
    sys.path.insert(0, str(root))
    try:
        import nanochat.gpt as gpt
        from nanochat.common import COMPUTE_DTYPE
    except ImportError as e:
        raise SystemExit(f"importing nanochat from {root} failed ({e}); install what it needs into this "
                         "environment (see its pyproject.toml)") from e
    return gpt, COMPUTE_DTYPE


def build_nanochat(gpt, compute_dtype, config, device, compile_model):
    cfg = gpt.GPTConfig(sequence_len=config.max_position_embeddings, vocab_size=config.vocab_size,
                        n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
                        n_kv_head=config.num_key_value_heads, n_embd=config.hidden_size,
                        window_pattern=config.window_pattern or "L")
    with torch.device("meta"):  # as base_train.py: shapes first, then storage, then nanochat's init
        model = gpt.GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    model.train()
    optimizer = model.setup_optimizer()
    fwd = torch.compile(model, dynamic=False) if compile_model else model
    window_sizes = [w for w, _ in model.window_sizes]

    def step(x, y):
        loss = fwd(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss

    n = sum(p.numel() for p in model.parameters())
    return Trainee("nanochat", step, n, {"compute_dtype": str(compute_dtype).removeprefix("torch."),
                                         "estimate_flops": model.estimate_flops(), "window_sizes": window_sizes})


def random_batches(n, batch, seq, vocab, seed, device):
    """n (inputs, targets) pairs; targets are the inputs shifted by one, as nanochat's loader yields them."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(n)]
    return [(r[:, :-1].contiguous().to(device), r[:, 1:].contiguous().to(device)) for r in rows]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(trainee, batches, device, label):
    """Run one step per batch, each timed to a device synchronize. Returns the step times in seconds."""
    times = []
    tokens = batches[0][0].numel()
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        loss = trainee.step(x, y)
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        trainee.losses.append(loss.item())
        log(f"[{trainee.name}] {label} step {i + 1}/{len(batches)}: {dt:.3f} s, {tokens / dt:,.0f} tok/s, "
            f"loss {trainee.losses[-1]:.4f}")
    return times


def mem_allocated(device):
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, required=True, help="transformer blocks (nanochat's dial: sets every size)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="T, tokens per row (also sizes the windows)")
    p.add_argument("--device-batch-size", type=int, default=32, help="B, rows per step")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--head-dim", type=int, default=128, help="attention head size (64 or less suits CPU runs)")
    p.add_argument("--window-pattern", default="SSSL",
                   help="S/L per layer, tiled, last layer always L (nanochat's default SSSL; 'L' = full causal)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the first round")
    p.add_argument("--rounds", type=int, default=1, help="rounds of --steps timed steps, alternating the models")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the random token batches")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own default)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (dynamic=False)")
    p.add_argument("--compile-optimizer", choices=("on", "off"), default="on",
                   help="torch.compile our MuonAdamW update functions, as nanochat always does with its own "
                        "(default on; off skips ~20-60 s of compiling on CPU when inductor's cache is cold, and the "
                        "step is then ~10%% slower at d4)")
    p.add_argument("--attn-implementation", default="sdpa",
                   help="ours: sdpa, eager, flex_attention, flash_attention_2/3 or a Hub kernel id, if installed")
    p.add_argument("--nanochat-dir", help="a karpathy/nanochat checkout: also time its GPT + MuonAdamW, print ratio")
    args = p.parse_args(argv)
    for name in ("depth", "max_seq_len", "device_batch_size", "vocab_size", "head_dim", "steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def bench(args):
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = load_average()
    if device.type == "cpu" and load is not None and load + torch.get_num_threads() > (os.cpu_count() or 1):
        # other jobs' threads and ours then share cores, and one slow thread stalls every parallel op
        log(f"WARNING: load average {load:.1f} on {os.cpu_count()} cores: CPU timings will be noisy; "
            "compare within one run (--rounds) or use fewer --threads")
    nanochat = import_nanochat(args.nanochat_dir, device) if args.nanochat_dir else None  # fail before any compute
    if args.warmup == 0 and (args.compile or args.compile_optimizer == "on"):
        log("WARNING: --warmup 0 with compilation: the first timed step includes compiling")

    config = NanoChatConfig(depth=args.depth, head_dim=args.head_dim, vocab_size=args.vocab_size,
                            max_position_embeddings=args.max_seq_len, window_pattern=args.window_pattern,
                            attn_implementation=args.attn_implementation)
    compile_opt = args.compile_optimizer == "on"
    fpt = flops_per_token(config)
    peak = peak_flops(device)
    # fresh batches for every step (a reused batch would be memorised and the losses would say nothing)
    batches = random_batches(args.warmup + args.steps * args.rounds, args.device_batch_size, args.max_seq_len,
                             args.vocab_size, args.seed, device)
    warm = batches[:args.warmup]

    trainees = []
    builders = [lambda: build_ours(config, device, args.compile, compile_opt)]
    if nanochat:
        builders.append(lambda: build_nanochat(*nanochat, config, device, args.compile))
    for build in builders:  # build and warm up one model at a time, so each one's resident memory can be measured
        before = mem_allocated(device)
        torch.manual_seed(args.seed)
        t = build()
        run_steps(t, warm, device, "warmup")
        sync(device)
        t.resident_bytes = mem_allocated(device) - before
        t.losses.clear()
        trainees.append(t)
    if nanochat and trainees[0].num_params != trainees[1].num_params:
        log(f"WARNING: parameter counts differ (ours {trainees[0].num_params:,}, nanochat "
            f"{trainees[1].num_params:,}): this nanochat checkout has another architecture")

    tokens = args.device_batch_size * args.max_seq_len * args.steps
    for r in range(args.rounds):
        for t in (trainees if r % 2 == 0 else trainees[::-1]):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timed = batches[args.warmup + r * args.steps: args.warmup + (r + 1) * args.steps]
            times = run_steps(t, timed, device, f"round {r + 1}/{args.rounds}")
            t.step_s += times
            t.round_tok_per_s.append(tokens / sum(times))
            if device.type == "cuda":
                others = sum(o.resident_bytes for o in trainees if o is not t)
                t.peak_bytes = max(t.peak_bytes, torch.cuda.max_memory_allocated(device) - others)

    def summary(t):
        tok_s = statistics.median(t.round_tok_per_s)
        return {"tok_per_s": round(tok_s, 1), "mfu": round(fpt * tok_s / peak, 5) if peak else None,
                "peak_mem_gib": round(t.peak_bytes / GIB, 3) if device.type == "cuda" else None,
                "step_s_median": round(statistics.median(t.step_s), 5),
                "round_tok_per_s": [round(v, 1) for v in t.round_tok_per_s],
                "params": t.num_params, "loss_first": round(t.losses[0], 4), "loss_last": round(t.losses[-1], 4),
                **t.detail}

    ours = summary(trainees[0])
    result = {"tok_per_s": ours["tok_per_s"], "mfu": ours["mfu"], "peak_mem_gib": ours["peak_mem_gib"],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "load_average": [load, load_average()],
              "torch": torch.__version__, "flops_per_token": fpt,
              "peak_flops": peak,
              "settings": {k: getattr(args, k) for k in ("depth", "max_seq_len", "device_batch_size", "vocab_size",
                                                          "head_dim", "window_pattern", "steps", "warmup", "rounds",
                                                          "seed", "compile")},
              "ours": ours}
    if nanochat:
        result["nanochat"] = summary(trainees[1])
        ratios = [a / b for a, b in zip(trainees[0].round_tok_per_s, trainees[1].round_tok_per_s)]
        result["ratio"] = round(statistics.median(ratios), 4)
    return result


def main(argv=None):
    args = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # nanochat and libraries print; stdout is for the JSON only
        result = bench(args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
