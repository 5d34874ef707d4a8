"""CORE scoring throughput (examples/s), printed as one line of JSON on stdout.

    python bench/core_throughput.py                                  # tiny fixture model, ../shared/data/core_sample
    python bench/core_throughput.py --random-depth 4 --random-dim 256 --nanochat-dir ~/src/nanochat
    python bench/core_throughput.py --model DIR --bundle DIR --max-per-task 100 --batch-size 64

Ours = `evaluation.core.evaluate_core` (prompts, tokenization, batched scoring). With --nanochat-dir, nanochat's own
evaluator (`nanochat.core_eval.evaluate_task`, one example per forward) is imported from that checkout at run time
(never copied) and run on the same rows (our loader applies nanochat's shuffle and cut, checked against nanochat's
in tests/evaluation/test_core.py). For one of our NanoChat checkpoints it runs on nanochat's own GPT with the same weights
(converted with `modeling_nanochat.checkpoints.convert.to_nanochat`) and nanochat's tokenizer.pkl; any other model is handed to
it through a `model(ids) -> logits` wrapper with nanochat's HuggingFaceTokenizer. Both must agree on every task's
accuracy ("same_accuracy"). Timing: one untimed warm-up round, then --rounds rounds; within a round the two take
turns task by task (ABBA order across rounds), so drift in a shared machine's load hits both alike. A task's time is
its best round; examples_per_s = examples / the sum over tasks; "ratio" = ours / nanochat in examples/s. On a CPU
shared with other jobs, pass --threads 1 (see its help).

--whole-process (needs --nanochat-dir and one of our NanoChat checkpoints): also times the two evaluators as a user runs
them, each a fresh process on the whole bundle: `python -m evaluation.core --model DIR --bundle B` against nanochat's
`python -m scripts.base_eval --eval core --model-tag bench` (run from the checkout, NANOCHAT_BASE_DIR pointing at a
temporary base dir that holds the converted checkpoint, its tokenizer and the bundle, NANOCHAT_DTYPE=float32). Start-up,
imports, model loading and data reading count; the processes take turns (ABBA) for --rounds rounds, the JSON's
"whole_process" has the median seconds of each, their ratio, and whether the per-task accuracies read back from the
two processes' outputs agree. --threads reaches both processes as OMP_NUM_THREADS.

Without --model: --random-depth/--random-dim build a seeded random NanoChat (vocab of the fixture tokenizer), else the
tiny committed fixture tests/fixtures/nanochat_current is converted. fp32 on CPU; on CUDA both run in fp32 too.
"""

import argparse
import contextlib
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from evaluation.core import evaluate_core  # noqa: E402
from evaluation.core_bundle import ensure_bundle, load_bundle, load_rows  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
SHARED_SAMPLE = REPO.parent / "shared" / "data" / "core_sample"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def make_model_dir(args, tmp: str) -> str:
    from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM
    from modeling_nanochat.checkpoints.convert import convert, save_hf_checkpoint
    from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer

    out = os.path.join(tmp, "model")
    if args.random_depth is None:
        return convert(str(FIXTURES / "nanochat_current"), out, tokenizer_dir=str(FIXTURES / "nanochat_tokenizer"))
    tok = convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))
    kw = {"hidden_size": args.random_dim} if args.random_dim else {}
    config = NanoChatConfig(depth=args.random_depth, vocab_size=len(tok), max_position_embeddings=2048, **kw)
    torch.manual_seed(0)
    model = NanoChatForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # nanochat's init zeroes every block's output; noise makes each layer count
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return save_hf_checkpoint(model.state_dict(), config, out, tokenizer=tok)


class NanochatSide:
    """nanochat's evaluator from a user's checkout, on nanochat's GPT when the model is ours, else on a wrapper."""

    def __init__(self, nanochat_dir: str, model_dir: str, hf_model, hf_tokenizer, device, tmp: str):
        os.environ.setdefault("NANOCHAT_DTYPE", "float32")
        sys.path.insert(0, os.path.abspath(os.path.expanduser(nanochat_dir)))
        from nanochat.core_eval import evaluate_task
        self.evaluate_task, self.device = evaluate_task, device
        if getattr(hf_model.config, "model_type", None) == "nanochat_hf":
            from nanochat.tokenizer import RustBPETokenizer

            from bench.nanochat_runtime import nanochat_gpt
            model = nanochat_gpt(model_dir, device, tmp)  # converted into <tmp>/nanochat, tokenizer.pkl included
            self.converted = os.path.join(tmp, "nanochat")
            tokenizer = RustBPETokenizer.from_directory(os.path.join(tmp, "nanochat"))
            self.model, self.tokenizer, self.kind = model, tokenizer, "nanochat GPT"
        else:
            from nanochat.tokenizer import HuggingFaceTokenizer
            self.model = lambda ids: hf_model(ids).logits
            self.tokenizer, self.kind = HuggingFaceTokenizer(hf_tokenizer.backend_tokenizer), "our model, wrapped"

    @torch.no_grad()
    def accuracy(self, spec, rows) -> float:
        meta = {"task_type": spec.task_type, "num_fewshot": spec.num_fewshot,
                "continuation_delimiter": spec.delimiter, "dataset_uri": str(spec.data_path)}
        return self.evaluate_task(self.model, self.tokenizer, [r.data for r in rows], self.device, meta)


def whole_process(args, model_dir: str, converted: str, bundle: str, tmp: str) -> dict:
    """Both evaluators as fresh processes on the whole bundle, ABBA over --rounds rounds: median wall seconds.
    `converted`: the nanochat checkpoint (and tokenizer.pkl) NanochatSide already wrote for the same weights."""
    base = os.path.join(tmp, "nanochat_base")  # nanochat's layout: base_checkpoints/<tag>, tokenizer/, eval_bundle
    os.makedirs(os.path.join(base, "base_checkpoints"))
    os.makedirs(os.path.join(base, "tokenizer"))
    os.symlink(converted, os.path.join(base, "base_checkpoints", "bench"))
    for name in ("tokenizer.pkl", "token_bytes.pt"):  # nanochat's base_eval loads both
        if os.path.exists(os.path.join(converted, name)):
            os.symlink(os.path.join(converted, name), os.path.join(base, "tokenizer", name))
    os.symlink(os.path.abspath(bundle), os.path.join(base, "eval_bundle"))
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, NANOCHAT_DTYPE="float32")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    device = "cuda" if str(args.device).startswith("cuda") else "cpu"
    ours_json = os.path.join(tmp, "ours_core.json")
    extra = ["--max-per-task", str(args.max_per_task)] if args.max_per_task > 0 else []
    commands = {
        "ours": ([sys.executable, "-m", "evaluation.core", "--model", model_dir, "--bundle", bundle, "--device",
                  args.device, "--batch-size", str(args.batch_size), "--output", ours_json, "--no-progress", *extra],
                 str(REPO)),
        "nanochat": ([sys.executable, "-m", "scripts.base_eval", "--eval", "core", "--model-tag", "bench",
                      "--device-type", device, *extra], os.path.abspath(os.path.expanduser(args.nanochat_dir))),
    }
    seconds = {name: [] for name in commands}
    for r in range(args.rounds):
        for name in (list(commands) if r % 2 == 0 else list(commands)[::-1]):
            cmd, cwd = commands[name]
            t = time.perf_counter()
            done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
            seconds[name].append(time.perf_counter() - t)
            if done.returncode:
                raise SystemExit(f"{name}'s evaluator failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            log(f"whole process, round {r + 1}: {name} {seconds[name][-1]:.2f}s")
    ours_acc = {k: v["accuracy"] for k, v in json.load(open(ours_json))["results"].items()}
    (nano_csv,) = [os.path.join(base, "base_eval", f) for f in os.listdir(os.path.join(base, "base_eval"))]
    with open(nano_csv) as f:
        rows = [row for row in csv.reader(f) if row]
    nano_acc = {row[0].strip(): float(row[1]) for row in rows[1:] if row[0].strip() in ours_acc}
    med = {name: statistics.median(v) for name, v in seconds.items()}
    return {"seconds_median": med, "seconds_all": seconds, "ratio": med["nanochat"] / med["ours"],
            "same_accuracy": set(nano_acc) == set(ours_acc)
            and all(abs(nano_acc[t] - ours_acc[t]) < 1e-4 for t in ours_acc)}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a transformers causal LM directory (default: see below)")
    p.add_argument("--random-depth", type=int, default=None, help="without --model: a random NanoChat of this depth")
    p.add_argument("--random-dim", type=int, default=None, help="its hidden size (default: the depth dial's)")
    p.add_argument("--bundle", default=None, help="eval bundle (default: ../shared/data/core_sample if present)")
    p.add_argument("--max-per-task", type=int, default=-1)
    p.add_argument("--tasks", default=None)
    p.add_argument("--nanochat-dir", default=None, help="a checkout of karpathy/nanochat to time its evaluator too")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batch-tokens", type=int, default=None, help="default: evaluate_core's (2048 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--whole-process", action="store_true",
                   help="also time both evaluators as fresh processes on the whole bundle (see above)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). On a shared machine use 1: with more threads than free "
                        "cores, OpenMP's spinning slows small per-example forwards (nanochat's) by 10x and more")
    args = p.parse_args(argv)
    if args.whole_process and (not args.nanochat_dir or args.tasks):
        p.error("--whole-process needs --nanochat-dir and runs the whole bundle (no --tasks)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_nanochat  # noqa: F401 - registers nanochat_hf with the Auto classes

    bundle = args.bundle or (str(SHARED_SAMPLE) if SHARED_SAMPLE.exists() else None)
    bundle = ensure_bundle(bundle)
    tasks = args.tasks.split(",") if args.tasks else None
    data = [(spec, load_rows(spec, args.max_per_task)) for spec in load_bundle(bundle, tasks)]
    n_examples = sum(len(rows) for _, rows in data)
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON line; deepspeed's import prints there
            model_dir = args.model or make_model_dir(args, tmp)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        kw = dict(max_per_task=args.max_per_task, batch_size=args.batch_size,
                  max_batch_tokens=args.max_batch_tokens, device=args.device, progress=False)
        sides = {"ours": lambda spec, rows: evaluate_core(model, tokenizer, bundle, tasks=[spec.label], **kw)
                 ["results"][spec.label]["accuracy"]}
        nano = None
        if args.nanochat_dir:
            nano = NanochatSide(args.nanochat_dir, model_dir, model, tokenizer, args.device, tmp)
            sides["nanochat"] = nano.accuracy
            if args.whole_process and nano.kind != "nanochat GPT":  # before any timing: fail in seconds
                raise SystemExit("--whole-process needs one of our NanoChat checkpoints (nanochat's base_eval loads "
                                 "only its own GPT)")
        # per task, the sides take turns (ABBA over rounds): load drift on a shared machine hits both alike
        best = {name: {spec.label: float("inf") for spec, _ in data} for name in sides}
        acc = {name: {} for name in sides}
        for r in range(args.rounds + 1):  # round 0 warms up
            this_round = dict.fromkeys(sides, 0.0)
            for spec, rows in data:
                for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                    sync()
                    t = time.perf_counter()
                    acc[name][spec.label] = sides[name](spec, rows)
                    sync()
                    dt = time.perf_counter() - t
                    this_round[name] += dt
                    if r > 0:
                        best[name][spec.label] = min(best[name][spec.label], dt)
            log(f"round {r}" + (" (warm-up)" if r == 0 else "") + ": " + ", ".join(
                f"{name} {dt:.2f}s" for name, dt in this_round.items()))
        seconds = {name: sum(b.values()) for name, b in best.items()}
        result = {
            "model": args.model or ("random d%s" % args.random_depth if args.random_depth else "tiny fixture"),
            "params": sum(p.numel() for p in model.parameters()), "bundle": str(bundle), "examples": n_examples,
            "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "batch_size": args.batch_size,
            "rounds": args.rounds,
            "ours": {"seconds": seconds["ours"], "examples_per_s": n_examples / seconds["ours"]},
            "per_task_examples_per_s": {name: {spec.label: len(rows) / best[name][spec.label] for spec, rows in data}
                                        for name in sides},
        }
        if nano is not None:
            result["nanochat"] = {"seconds": seconds["nanochat"], "examples_per_s": n_examples / seconds["nanochat"],
                                  "runs_on": nano.kind}
            result["ratio"] = seconds["nanochat"] / seconds["ours"]
            result["same_accuracy"] = all(abs(acc["ours"][t] - acc["nanochat"][t]) < 1e-6 for t in acc["ours"])
        if args.whole_process:
            result["whole_process"] = whole_process(args, model_dir, nano.converted, bundle, tmp)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
