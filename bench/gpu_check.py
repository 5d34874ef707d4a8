"""GPU check: numerics, attention backends, compiled pretraining, fp8 and decode speed on one GPU, as one JSON line.

    bench/gpu_check.sh --nanochat-dir ~/src/nanochat     # one H100/H200, about 5-8 minutes, nothing downloaded
    bench/gpu_check.sh --dry-run                         # every branch on CPU at tiny sizes (about a minute)

Everything is built locally: models from NanoChatConfig with seeded weights, random token batches, no tokenizer, no
Hub access (HF_HUB_OFFLINE=1 is set before anything imports huggingface_hub). Sections, each recording its own
"status" ("ok", "skipped: <reason>" or "error: <message>") so that one failure does not stop the others:

  bf16_vs_fp32   our logits in bf16 (bf16 weights, and fp32 weights under bf16 autocast) against fp32: max/mean abs
                 diff and top-1 agreement.
  attention      every attention implementation transformers can run here (sdpa, eager, flex_attention, and
                 kernels-community/flash-attn3 through the `kernels` Hub integration on Hopper) against sdpa.
  pretrain       a torch.compile'd pretraining run (bench/pretrain_throughput.py): tok/s and MFU, ours and, with
                 --nanochat-dir, nanochat's GPT side by side.
  fp8            our training step with torchao float8 matmuls (the --fp8 of recipes/pretrain.py); needs CUDA
                 capability >= 8.9. The dry run still walks the same code without the fp8 conversion.
  decode         decode tok/s at batch 1/8/32 (bench/decode_throughput.py, all its paths), ours and nanochat's
                 Engine (the dry run: batch 1/8).

Every section records "peak_mem": torch.cuda.max_memory_allocated (reset per section) on CUDA; on CPU the process'
ru_maxrss, a lifetime peak that cannot be reset (so only its growth from section to section means anything).
"machine" records torch/transformers versions, device name and capability, and the attention pick_attention()
chooses (used for ours in the pretrain section). Progress and library output go to stderr; stdout carries only the
JSON line. --budget-s makes later sections skip (with that reason) once the run has used its time.
"""

import os

# before anything imports huggingface_hub (it reads these once): the check must never wait on a download, and a
# Hub kernel or nanochat's FA3 must come from the local cache or not at all
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402

import bench.decode_throughput as decode_bench  # noqa: E402
import bench.pretrain_throughput as pretrain_bench  # noqa: E402
from modeling_nanochat import NanoChatConfig  # noqa: E402
from modeling_nanochat.optim.scaling import flops_per_token, peak_flops  # noqa: E402
from modeling_nanochat.utils.attention import FLASH_ATTN3, pick_attention  # noqa: E402

MIB, GIB = 2**20, 2**30
NO_NANOCHAT = "skipped: no --nanochat-dir"
FP8_CAPABILITY = (8, 9)  # torchao's float8 matmuls need Ada/Hopper (sm89+), as modeling_nanochat.pretrain.setup says


@dataclass
class Sizes:
    """Model and workload sizes. The GPU run is nanochat's d12 at its training shapes; the dry run is the same code at
    sizes a 2-core CPU runs in seconds."""
    depth: int
    head_dim: int
    vocab_size: int
    seq_len: int
    logits_batch: int  # bf16_vs_fp32 and attention: one forward of [logits_batch, logits_len]
    logits_len: int
    train_batch: int  # pretrain and fp8: [train_batch, seq_len] per step
    train_steps: int  # timed steps per round; pretrain runs train_rounds rounds (ABBA with nanochat)
    train_rounds: int
    train_warmup: int  # untimed steps first (compilation)
    compile_optimizer: bool
    prompt_len: int
    new_tokens: int
    decode_repeats: int
    decode_batches: str  # decode tok/s at these batch sizes


GPU_SIZES = Sizes(depth=12, head_dim=128, vocab_size=32768, seq_len=2048, logits_batch=4, logits_len=1024,
                  train_batch=32, train_steps=10, train_rounds=3, train_warmup=3, compile_optimizer=True,
                  prompt_len=256, new_tokens=128, decode_repeats=2, decode_batches="1,8,32")
# the optimizer's compile is off on the dry run: with a cold inductor cache it alone costs about a minute of CPU, and
# it is the same flag pretrain_throughput already tests; the model itself is still compiled. Two decode batch sizes,
# not three: decode's compiled paths compile once per batch size (~10 s each on a cold cache here)
DRY_SIZES = Sizes(depth=2, head_dim=32, vocab_size=512, seq_len=64, logits_batch=2, logits_len=64,
                  train_batch=2, train_steps=2, train_rounds=1, train_warmup=1, compile_optimizer=False,
                  prompt_len=8, new_tokens=4, decode_repeats=1, decode_batches="1,8")


class Skip(Exception):
    """A section (or row) that cannot run here; the message is the reason."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# machine and memory
# ---------------------------------------------------------------------------------------------------------------------

def version_of(distribution):
    """An installed distribution's version, or None; read from its metadata, since importing torchao (say) is slow
    and prints from C."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device, attention):
    cuda = device.type == "cuda"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
            "peak_bf16_flops": peak_flops(device), "cpu_threads": torch.get_num_threads(),
            "kernels": version_of("kernels"), "torchao": version_of("torchao"),
            "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
            "attention_choice": {"name": attention[0], "reason": attention[1]}}


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem(device):
    """This section's peak: CUDA allocations since reset_peak, or the process' lifetime max RSS on CPU."""
    if device.type == "cuda":
        return {"cuda_max_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3)}
    try:
        import resource
    except ImportError:  # Windows
        return {"ru_maxrss_mib": None}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"ru_maxrss_mib": round(rss / (MIB if sys.platform == "darwin" else 1024), 1)}


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# helpers shared by the sections
# ---------------------------------------------------------------------------------------------------------------------

def seeded_model(ctx, dtype):
    """Our model with nanochat's init plus seeded noise (decode_throughput's builder): nanochat zero-inits the output
    projections, and logits of a zero-initialised model would agree across precisions trivially."""
    s = ctx.sizes
    ns = SimpleNamespace(depth=s.depth, aspect_ratio=64, head_dim=s.head_dim, vocab_size=s.vocab_size,
                         seq_len=s.seq_len, seed=ctx.seed)
    return decode_bench.build_model(ns, ctx.device, dtype)


def random_ids(ctx, rows, length):
    g = torch.Generator().manual_seed(ctx.seed + 1)
    return torch.randint(0, ctx.sizes.vocab_size, (rows, length), generator=g).to(ctx.device)


def compare(ref, other):
    """How far `other` logits are from `ref` ([B, T, V], compared in fp32)."""
    ref, other = ref.float(), other.float()
    diff = (ref - other).abs()
    return {"max_abs_diff": round(diff.max().item(), 6), "mean_abs_diff": round(diff.mean().item(), 6),
            "top1_agreement": round((ref.argmax(-1) == other.argmax(-1)).float().mean().item(), 6)}


def timed_forward(model, ids, device):
    """(logits, seconds) of one forward without grad."""
    pretrain_bench.sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    pretrain_bench.sync(device)
    return logits, time.perf_counter() - t0


def error_text(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]


# ---------------------------------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------------------------------

def section_bf16_vs_fp32(ctx):
    """fp32 reference, then the two bf16 modes in use: bf16 weights (inference, decode) and fp32 weights under bf16
    autocast (training, as Accelerate's bf16 mixed precision runs it)."""
    model = seeded_model(ctx, torch.float32)
    ids = random_ids(ctx, ctx.sizes.logits_batch, ctx.sizes.logits_len)
    ref, _ = timed_forward(model, ids, ctx.device)
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
        autocast, _ = timed_forward(model, ids, ctx.device)
    bf16, _ = timed_forward(model.to(torch.bfloat16), ids, ctx.device)
    return {"attn_implementation": model.config._attn_implementation, "tokens": ids.numel(),
            "bf16_weights": compare(ref, bf16), "autocast_bf16": compare(ref, autocast)}


def attention_candidates(device):
    """(name, None) for each implementation to try, or (name, skip reason) for one that cannot run here."""
    from transformers.utils import is_torch_flex_attn_available
    choice, reason = pick_attention(device)
    return [("sdpa", None), ("eager", None),
            ("flex_attention", None if is_torch_flex_attn_available() else "torch has no flex_attention"),
            (FLASH_ATTN3, None if choice == FLASH_ATTN3 else reason.removeprefix("sdpa: "))]


def section_attention(ctx):
    """Each implementation's logits against sdpa's, on one model. bf16 on CUDA (the flash kernels take no fp32), fp32
    on CPU. flex_attention has no backward on CPU, which does not matter here: everything runs under no_grad."""
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    model = seeded_model(ctx, dtype)
    ids = random_ids(ctx, ctx.sizes.logits_batch, ctx.sizes.logits_len)
    rows, ref = {}, None
    for name, skip in attention_candidates(ctx.device):
        if skip:
            rows[name] = {"status": f"skipped: {skip}"}
            continue
        rows[name] = attention_row(model, name, ids, ref, ctx.device)
        if name == "sdpa":
            ref = rows[name].pop("logits", None)
            if ref is None:
                raise RuntimeError(f"sdpa, the reference, failed: {rows[name]['status']}")
    ctx.attention_rows = rows
    return {"dtype": str(dtype).removeprefix("torch."), "tokens": ids.numel(), "reference": "sdpa",
            "implementations": rows}


def attention_row(model, name, ids, ref, device):
    """One implementation: load it (a Hub kernel comes from the local cache only), a warm-up forward (flex and the
    kernels compile or load on first use), then a timed one."""
    try:
        model.set_attn_implementation(name)
    except Exception as e:
        traceback.print_exc()
        if "offline" in str(e) and os.environ.get("HF_HUB_OFFLINE") == "1":  # an environment fact, not a bug
            return {"status": f"skipped: {name} is not in the local Hub cache and this run downloads nothing "
                              "(to cache it, online: python -c \"from kernels import get_kernel; "
                              f"get_kernel('{name}')\")"}
        return {"status": f"error: {error_text(e)}"}
    try:
        if model.config._attn_implementation != name:  # transformers may fall back silently
            return {"status": f"error: asked for {name}, transformers set {model.config._attn_implementation}"}
        timed_forward(model, ids, device)
        logits, seconds = timed_forward(model, ids, device)
    except Exception as e:
        traceback.print_exc()
        return {"status": f"error: {error_text(e)}"}
    finally:
        with contextlib.suppress(Exception):
            model.set_attn_implementation("sdpa")
    row = {"status": "ok", "forward_s": round(seconds, 5)}
    if ref is None:
        row["logits"] = logits
    else:
        row.update(compare(ref, logits))
    return row


def training_attention(ctx):
    """Our attention for the training sections: pick_attention's choice, unless the attention section saw it fail
    (then sdpa, rather than spending the run's minutes compiling something already known to break)."""
    name, reason = ctx.attention
    row = (ctx.attention_rows or {}).get(name, {"status": "ok"})
    if row["status"] != "ok":
        return "sdpa", f"sdpa: {name} failed in the attention section ({row['status']})"
    return name, reason


def pretrain_argv(ctx, attn, nanochat_dir):
    s = ctx.sizes
    argv = ["--depth", str(s.depth), "--head-dim", str(s.head_dim), "--vocab-size", str(s.vocab_size),
            "--max-seq-len", str(s.seq_len), "--device-batch-size", str(s.train_batch), "--steps", str(s.train_steps),
            "--rounds", str(s.train_rounds), "--warmup", str(s.train_warmup), "--device", str(ctx.device),
            "--seed", str(ctx.seed), "--compile", "--compile-optimizer", "on" if s.compile_optimizer else "off",
            "--attn-implementation", attn]
    return argv + (["--nanochat-dir", nanochat_dir] if nanochat_dir else [])


def section_pretrain(ctx):
    """bench/pretrain_throughput.py in this process (its bench(), so its JSON does not reach stdout). If a run fails,
    the next attempt drops what may have caused it: first a non-sdpa attention, then nanochat, so that the rows that
    can run still come back, and every failure is recorded."""
    attn, reason = training_attention(ctx)
    attempts = [(attn, ctx.nanochat_dir)]
    if attn != "sdpa":
        attempts.append(("sdpa", ctx.nanochat_dir))
    if ctx.nanochat_dir:
        attempts.append(("sdpa", None))
    failures = []
    for attn_try, nanochat_dir in attempts:
        log(f"pretrain: attention {attn_try}, nanochat {'yes' if nanochat_dir else 'no'}")
        try:
            result = pretrain_bench.bench(pretrain_bench.parse_args(pretrain_argv(ctx, attn_try, nanochat_dir)))
        except (Exception, SystemExit) as e:  # import_nanochat raises SystemExit for a bad checkout
            traceback.print_exc()
            failures.append({"attn_implementation": attn_try, "nanochat": bool(nanochat_dir), "error": error_text(e)})
            free_memory(ctx.device)
            continue
        ctx.pretrain = result
        return pretrain_summary(result, ctx, attn_try, reason if attn_try == attn else "fallback after a failure",
                                nanochat_dir, failures)
    raise RuntimeError("every attempt failed: " + "; ".join(f["error"] for f in failures))


def pretrain_summary(result, ctx, attn, reason, nanochat_dir, failures):
    row = {"status": "ok", **result["ours"]}
    out = {"settings": result["settings"], "flops_per_token": result["flops_per_token"],
           "peak_flops": result["peak_flops"], "attention": {"name": attn, "reason": reason}, "ours": row}
    if nanochat_dir:
        out["nanochat"] = {"status": "ok", **result["nanochat"], "flash_attn3": nanochat_has_fa3()}
        out["ratio"] = result["ratio"]
    else:
        out["nanochat"] = {"status": NO_NANOCHAT if not ctx.nanochat_dir else
                           "error: " + failures[-1]["error"]}
    if failures:
        out["failed_attempts"] = failures
    return out


def nanochat_has_fa3():
    """Whether the imported nanochat found its FA3 kernel (offline, only a cached one) or fell back to SDPA."""
    module = sys.modules.get("nanochat.flash_attention")
    return getattr(module, "HAS_FA3", None)


def fp8_convert(ctx):
    """The fp8 conversion of recipes/pretrain.py --fp8, or None where it cannot run (the step then runs unconverted,
    so the dry run still walks this section's code, this import included)."""
    from modeling_nanochat.pretrain.setup import _apply_fp8
    if ctx.device.type != "cuda" or torch.cuda.get_device_capability(ctx.device) < FP8_CAPABILITY:
        return None
    return _apply_fp8


def fp8_trainee(ctx, config, convert):
    """Our model (fp8 matmuls when `convert`), compiled as in the pretrain section: pretrain_throughput's own
    builder, converting before the optimizer is built (as recipes/pretrain.py --fp8 does)."""
    trainee = pretrain_bench.build_ours(config, ctx.device, True, ctx.sizes.compile_optimizer, convert=convert)
    trainee.name = "ours-fp8" if convert else "ours-fp8-dry"
    return trainee


def section_fp8(ctx):
    convert = fp8_convert(ctx)
    if convert is None and not ctx.dry_run:
        raise Skip(f"needs CUDA capability >= {'.'.join(map(str, FP8_CAPABILITY))}")
    s = ctx.sizes
    attn, _ = training_attention(ctx)
    config = NanoChatConfig(depth=s.depth, head_dim=s.head_dim, vocab_size=s.vocab_size,
                            max_position_embeddings=s.seq_len, attn_implementation=attn)
    torch.manual_seed(ctx.seed)
    trainee = fp8_trainee(ctx, config, convert)
    batches = pretrain_bench.random_batches(s.train_warmup + s.train_steps, s.train_batch, s.seq_len, s.vocab_size,
                                            ctx.seed, ctx.device)
    pretrain_bench.run_steps(trainee, batches[:s.train_warmup], ctx.device, "warmup")
    times = pretrain_bench.run_steps(trainee, batches[s.train_warmup:], ctx.device, "timed")
    tok_s = s.train_batch * s.seq_len * s.train_steps / sum(times)
    peak = peak_flops(ctx.device)
    out = {"attn_implementation": attn, "tok_per_s": round(tok_s, 1),
           "mfu_vs_bf16_peak": round(flops_per_token(config) * tok_s / peak, 5) if peak else None,
           "loss_last": round(trainee.losses[-1], 4), "loss_finite": all(map(lambda v: v == v, trainee.losses))}
    bf16 = ((ctx.pretrain or {}).get("ours") or {}).get("tok_per_s")
    out["speedup_vs_bf16_pretrain"] = round(tok_s / bf16, 4) if bf16 and convert else None
    if convert is None:  # dry run: the code ran, the fp8 step itself did not
        out["status"] = f"skipped: needs CUDA capability >= {'.'.join(map(str, FP8_CAPABILITY))}"
        out["dry_run_note"] = "the same step ran without the fp8 conversion, to check this section's code"
    return out


def decode_argv(ctx):
    s = ctx.sizes
    dtype = "bfloat16" if ctx.device.type == "cuda" else "float32"
    argv = ["--depth", str(s.depth), "--head-dim", str(s.head_dim), "--vocab-size", str(s.vocab_size),
            "--seq-len", str(s.seq_len), "--prompt-len", str(s.prompt_len), "--new-tokens", str(s.new_tokens),
            "--batch-sizes", s.decode_batches, "--repeats", str(s.decode_repeats), "--device", str(ctx.device),
            "--dtype", dtype, "--seed", str(ctx.seed)]
    argv += ["--paths", ctx.decode_paths] if ctx.decode_paths else []  # else decode_throughput's own default
    return argv + (["--nanochat-dir", ctx.nanochat_dir] if ctx.nanochat_dir else [])


def section_decode(ctx):
    """bench/decode_throughput.py's main (its JSON line goes to stderr with the rest of the section's output).
    Without --nanochat-dir, or if nanochat's side fails, ours still runs and nanochat's rows say why not."""
    argv, failure = decode_argv(ctx), None
    try:
        result = decode_bench.main(argv)
    except (Exception, SystemExit) as e:
        if not ctx.nanochat_dir:
            raise
        traceback.print_exc()
        failure = error_text(e)
        free_memory(ctx.device)
        result = decode_bench.main(argv[:-2])  # without --nanochat-dir
    decode = result["decode"]
    out = {"dtype": result["dtype"], "prompt_len": result["prompt_len"], "new_tokens": result["new_tokens"],
           "ours": {"status": "ok", "prefill": {p: v for p, v in result["prefill"].items() if p != "nanochat_engine"},
                    "decode": {p: v for p, v in decode.items() if p != "nanochat_engine"}}}
    if "nanochat_engine" in decode:
        out["nanochat"] = {"status": "ok", "prefill": result["prefill"]["nanochat_engine"],
                           "decode": decode["nanochat_engine"], "flash_attn3": nanochat_has_fa3()}
        out["ratio_vs_nanochat"] = result["ratio_vs_nanochat"]
        out["same_greedy_tokens"] = result["same_greedy_tokens"]
    else:
        out["nanochat"] = {"status": f"error: {failure}" if failure else NO_NANOCHAT}
    return out


SECTIONS = {"bf16_vs_fp32": section_bf16_vs_fp32, "attention": section_attention, "pretrain": section_pretrain,
            "fp8": section_fp8, "decode": section_decode}


# ---------------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------------

def run_section(name, fn, ctx, started):
    """One section with its own status, wall time and peak memory; nothing it raises reaches the caller."""
    elapsed = time.perf_counter() - started
    if elapsed > ctx.budget_s:
        return {"status": f"skipped: the run's --budget-s {ctx.budget_s:.0f} s was spent ({elapsed:.0f} s)"}
    log(f"=== {name} ({elapsed:.0f} s into the run)")
    reset_peak(ctx.device)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # libraries and the reused benches print; stdout is the JSON's
            result = fn(ctx)
        result.setdefault("status", "ok")
        result = {"status": result.pop("status"), **result}  # status first, for whoever reads the line by eye
    except Skip as e:
        result = {"status": f"skipped: {e}"}
    except (Exception, SystemExit) as e:
        traceback.print_exc()
        result = {"status": f"error: {error_text(e)}"}
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    result["peak_mem"] = peak_mem(ctx.device)
    free_memory(ctx.device)
    log(f"=== {name}: {result['status']} ({result['wall_s']} s)")
    return result


def resolve_device(args):
    if args.dry_run:
        return torch.device("cpu")  # the dry run exists to run on a machine without the GPU
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="run every section on CPU at tiny sizes (depth 2, a few steps), to catch mistakes before a "
                        "GPU run")
    p.add_argument("--nanochat-dir", help="a karpathy/nanochat checkout, for nanochat's side-by-side rows in pretrain "
                                          "and decode (without it those rows say 'skipped: no --nanochat-dir')")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda when available; --dry-run: cpu)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="sections starting after this many seconds are skipped (default 480: an 8-minute slot)")
    p.add_argument("--decode-paths", help="our generation paths for the decode section (bench/decode_throughput.py "
                                          "--paths; default: all of its paths, the compiled ones included)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    unknown = set(filter(None, args.sections.split(","))) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


def json_stream():
    """A stream onto the real stdout for the JSON line, with file descriptor 1 itself pointed at stderr: compiled code
    (torchao's extension loader, inductor's compiler) prints at the C level, past any redirect_stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(saved, "w")


def main(argv=None, protect_stdout=False):
    """Run the chosen sections and print the JSON line; protect_stdout (the command line) also keeps C-level prints
    off stdout, after argparse has had its chance to print --help there."""
    args = parse_args(argv)
    out_stream = json_stream() if protect_stdout else sys.stdout
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    attention = pick_attention(device)
    log(f"gpu_check on {device}: attention for ours: {attention[1]}")
    ctx = SimpleNamespace(device=device, sizes=DRY_SIZES if args.dry_run else GPU_SIZES, dry_run=args.dry_run,
                          nanochat_dir=args.nanochat_dir, seed=args.seed, budget_s=args.budget_s, attention=attention,
                          decode_paths=args.decode_paths,
                          attention_rows=None, pretrain=None)
    chosen = [s for s in args.sections.split(",") if s]
    sections = {name: run_section(name, SECTIONS[name], ctx, started) for name in SECTIONS if name in chosen}
    out = {"bench": "gpu_check", "dry_run": args.dry_run, "machine": machine_info(device, attention),
           "sizes": asdict(ctx.sizes), "nanochat_dir": args.nanochat_dir, "sections": sections,
           "wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(out), file=out_stream, flush=True)
    return out


if __name__ == "__main__":
    main(protect_stdout=True)
