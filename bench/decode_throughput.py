"""Generation speed: prefill and decode tokens/s at batch 1, 8 and 32, printed as one line of JSON on stdout.

    python bench/decode_throughput.py                                 # depth 4, head dim 64, vocab 8192, CPU fp32
    python bench/decode_throughput.py --nanochat-dir ~/src/nanochat  # + nanochat's Engine on the same weights
    python bench/decode_throughput.py --depth 20 --vocab-size 32768 --prompt-len 2048 --new-tokens 256 \\
        --batch-sizes 1,8,32,128 --device cuda --dtype bfloat16 --nanochat-dir ~/src/nanochat

Paths, each timed like nanochat's scripts/infer_bench.py (the first token of a generation = prefill + first sample,
its time the TTFT; each later token = one decode step for all rows; decode tok/s = rows x steps / decode time):
* `generate`: transformers' `model.generate()` (greedy, our NanoChatCache), the prompt repeated on B rows, so its
  prefill is B x prompt tokens.
* `tool_generation`: `modeling_nanochat.generation.tool_use.generate`, nanochat's Engine loop on the HF API (one
  batch-1 prefill, the cache repeated to B rows, the calculator state machine): the path of our chat CLI, app and
  ChatCORE.
* `tool_generation_compiled`: the same loop with the switch on (`compile=True`: static cache, `torch.compile`d
  decode step; generation/static_decode.py). Compiling happens in the untimed warm-up (its seconds are reported as
  "compile_s").
* `generate_static_compiled`: `model.generate(cache_implementation="static")` with a compile config for every
  device (`static_decode.compile_generate`), what an HF user gets from the same switch.
* `nanochat_engine` (--nanochat-dir): nanochat's own `Engine` on its `GPT` holding the same weights (converted with
  `modeling_nanochat.checkpoints.convert.to_nanochat`; nanochat is imported from that directory at run time).
"prefill" is each path's batch-1 TTFT (prompt tokens / TTFT). "ratio_vs_nanochat" = ours / nanochat in tok/s
(> 1: ours faster). Every number is the median of --repeats runs; within a repeat the paths take turns, so a shared
machine's load drifts over all alike. "decode_tok_per_s_best" (and "decode_best") take each decode step's fastest
repeat instead: on a busy machine that is the closer estimate of what the code itself costs. "same_greedy_tokens":
our tool_generation and nanochat's Engine produced the same batch-1 greedy tokens (the weights really are the same).

The model has nanochat's init plus seeded noise; the tokenizer is a stand-in whose special tokens have ids the model
cannot emit, so every row decodes exactly --new-tokens and no tool call fires: this measures the loop, not the text.
"""

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402

from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM  # noqa: E402
from modeling_nanochat.tokenizer.tokenizer import SPECIAL_TOKENS  # noqa: E402
from modeling_nanochat.generation.static_decode import compile_generate  # noqa: E402
from modeling_nanochat.generation.tool_use import generate as tool_generate  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class StandInTokenizer:
    """What the two generation loops ask of a tokenizer (ours: HF-style lookups and len; nanochat's Engine:
    encode_special / get_bos_token_id), with special tokens at negative ids that sampling never produces."""

    unk_token_id = None

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def __len__(self):
        return self.vocab_size

    def convert_tokens_to_ids(self, token):
        return -1 - SPECIAL_TOKENS.index(token)

    def convert_ids_to_tokens(self, i):
        return SPECIAL_TOKENS[-1 - i]

    encode_special = convert_tokens_to_ids

    def get_bos_token_id(self):
        return self.encode_special("<|bos|>")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_iter, device):
    """Consume a generation (anything yielding once per generated token) -> (ttft, [decode step times])."""
    t0 = time.perf_counter()
    marks = []
    for _ in step_iter:
        _sync(device)
        marks.append(time.perf_counter())
    return marks[0] - t0, [b - a for a, b in zip(marks, marks[1:])]


def hf_generate_steps(model, prompt, batch, new_tokens, device):
    """(start time, [time of each step]) of one model.generate(): a logits processor runs right after every
    forward, so it marks the steps without touching the loop."""
    ids = torch.tensor([prompt], device=device).repeat(batch, 1)
    marks = []

    class Clock(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            _sync(device)
            marks.append(time.perf_counter())
            return scores

    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                   logits_processor=transformers.LogitsProcessorList([Clock()]))
    return t0, marks


def run_path(name, batch, ctx):
    """(ttft, decode step times, prefill tokens) of one generation on path `name`."""
    m, prompt, n, dev = ctx["model"], ctx["prompt"], ctx["new_tokens"], ctx["device"]
    if name in ("generate", "generate_static_compiled"):
        t0, marks = hf_generate_steps(ctx["static_model"] if name == "generate_static_compiled" else m, prompt,
                                      batch, n, dev)
        return marks[0] - t0, [b - a for a, b in zip(marks, marks[1:])], batch * len(prompt)
    if name.startswith("tool_generation"):
        steps = tool_generate(m, ctx["tokenizer"], prompt, num_samples=batch, max_tokens=n, temperature=0.0,
                              compile=name == "tool_generation_compiled")
    else:
        steps = ctx["engine"].generate(prompt, num_samples=batch, max_tokens=n, temperature=0.0)
    ttft, times = time_steps(steps, dev)
    return ttft, times, len(prompt)


def greedy_tokens(name, ctx):
    gen = (tool_generate(ctx["model"], ctx["tokenizer"], ctx["prompt"], num_samples=1, max_tokens=ctx["new_tokens"],
                         temperature=0.0, compile=name == "tool_generation_compiled")
           if name.startswith("tool_generation") else
           ctx["engine"].generate(ctx["prompt"], num_samples=1, max_tokens=ctx["new_tokens"], temperature=0.0))
    return [column[0] for column, _ in gen]


PATHS = ("generate", "tool_generation", "tool_generation_compiled", "generate_static_compiled")


def build_model(args, device, dtype):
    config = NanoChatConfig(depth=args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                            vocab_size=args.vocab_size, max_position_embeddings=args.seq_len)
    torch.manual_seed(args.seed)
    model = NanoChatForCausalLM(config)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # nanochat zero-inits projections and smear; noise makes every term count
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.generation_config.eos_token_id = None  # every row runs the full --new-tokens
    model.generation_config.pad_token_id = 0
    return model.to(device=device, dtype=dtype).eval()


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=64, help="width = depth x this, rounded to the head dim")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=2048, help="the model's context (sets the S/L windows)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--paths", default=",".join(PATHS), help=f"of ours: {','.join(PATHS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path and batch size (median)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 elsewhere (bf16 matmuls crawl on most CPUs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). On a CPU shared with other jobs use 1: idle-spinning "
                        "threads make small ops 10x slower and the numbers meaningless")
    p.add_argument("--nanochat-dir", default=None, help="a nanochat checkout: also time its Engine")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.prompt_len + args.new_tokens > args.seq_len:
        p.error(f"--prompt-len + --new-tokens ({args.prompt_len + args.new_tokens}) exceeds --seq-len {args.seq_len}")
    if args.prompt_len < 1 or args.new_tokens < 2:
        p.error("need --prompt-len >= 1 and --new-tokens >= 2 (one token is the prefill's)")
    return args


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batches = [int(b) for b in args.batch_sizes.split(",")]
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise SystemExit(f"--paths: unknown {sorted(unknown)}; choose from {','.join(PATHS)}")

    model = build_model(args, device, dtype)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, args.vocab_size - len(SPECIAL_TOKENS), (args.prompt_len,), generator=g).tolist()
    ctx = {"model": model, "prompt": prompt, "new_tokens": args.new_tokens, "device": device,
           "tokenizer": StandInTokenizer(args.vocab_size)}
    if "generate_static_compiled" in paths:  # a second model object: generate()'s compiled step is cached per model
        static_model = build_model(args, device, dtype)
        static_model.load_state_dict(model.state_dict())
        ctx["static_model"] = compile_generate(static_model)
    if args.nanochat_dir:
        from bench.nanochat_runtime import import_nanochat, nanochat_gpt

        import_nanochat(args.nanochat_dir, dtype)
        from nanochat.engine import Engine

        # stdout is for the JSON line: save_pretrained may import deepspeed, which prints there
        with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp, contextlib.redirect_stdout(sys.stderr):
            model.to(torch.float32).save_pretrained(f"{tmp}/ours")  # fp32 master weights, as nanochat keeps them
            model.to(dtype)
            ctx["engine"] = Engine(nanochat_gpt(f"{tmp}/ours", device, tmp), ctx["tokenizer"])
        paths.append("nanochat_engine")

    log(f"depth {args.depth}, {sum(p.numel() for p in model.parameters()):,} params, {device} {dtype}, "
        f"{torch.get_num_threads()} threads; prompt {args.prompt_len}, {args.new_tokens} new tokens; paths {paths}")
    raw = {(p, b): [] for p in paths for b in batches}
    compile_s = {}
    for b in batches:  # warm-up: allocator, kernels, first-call paths; compiled paths compile their shapes here
        for p in paths:
            t0 = time.perf_counter()
            run_path(p, b, ctx if "compiled" in p else {**ctx, "new_tokens": 4})
            if "compiled" in p:
                compile_s.setdefault(p, {})[str(b)] = round(time.perf_counter() - t0, 2)
    for r in range(args.repeats):
        for b in batches:
            order = paths if r % 2 == 0 else paths[::-1]  # ABBA across repeats
            for p in order:
                raw[(p, b)].append(run_path(p, b, ctx))
        log(f"repeat {r + 1}/{args.repeats} done")

    decode, prefill = {p: [] for p in paths}, {}
    for (p, b), runs in raw.items():
        ttfts = [t for t, _, _ in runs]
        rates = [b * len(steps) / sum(steps) for _, steps, _ in runs]
        tpots = [statistics.median(steps) for _, steps, _ in runs]
        floor = [min(run[1][i] for run in runs) for i in range(len(runs[0][1]))]  # each step's fastest repeat
        decode[p].append({"batch_size": b, "ttft_s": round(statistics.median(ttfts), 6),
                          "tpot_s": round(statistics.median(tpots), 6),
                          "decode_tok_per_s": round(statistics.median(rates), 1),
                          "decode_tok_per_s_best": round(b * len(floor) / sum(floor), 1),
                          "decode_steps": len(runs[0][1])})
        if b == 1:
            prefill[p] = {"time_s": round(statistics.median(ttfts), 6),
                          "tok_per_s": round(runs[0][2] / statistics.median(ttfts), 1)}
    out = {
        "bench": "decode_throughput",
        "model": {"depth": args.depth, "hidden_size": model.config.hidden_size, "head_dim": args.head_dim,
                  "num_attention_heads": model.config.num_attention_heads,
                  "num_key_value_heads": model.config.num_key_value_heads, "vocab_size": args.vocab_size,
                  "seq_len": args.seq_len, "window_pattern": model.config.window_pattern,
                  "params": sum(p.numel() for p in model.parameters())},
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "transformers": transformers.__version__, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "prefill": prefill, "decode": decode, "compile_s": compile_s,
    }
    if "engine" in ctx:
        ref = {d["batch_size"]: d for d in decode["nanochat_engine"]}

        def ratios(p, key):
            return {str(d["batch_size"]): round(d[key] / ref[d["batch_size"]][key], 3) for d in decode[p]}

        out["ratio_vs_nanochat"] = {
            p: {"prefill": round(prefill[p]["tok_per_s"] / prefill["nanochat_engine"]["tok_per_s"], 3),
                "decode": ratios(p, "decode_tok_per_s"), "decode_best": ratios(p, "decode_tok_per_s_best")}
            for p in paths if p != "nanochat_engine"}
        want = greedy_tokens("nanochat_engine", ctx)
        out["same_greedy_tokens"] = greedy_tokens("tool_generation", ctx) == want
        if "tool_generation_compiled" in paths:
            out["same_greedy_tokens_compiled"] = greedy_tokens("tool_generation_compiled", ctx) == want
    for p in paths:
        log(f"{p:>16}: prefill {prefill[p]['tok_per_s']:>10,.0f} tok/s | decode tok/s " +
            ", ".join(f"B={d['batch_size']}: {d['decode_tok_per_s']:,.0f}" for d in decode[p]))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
