"""Serving throughput: requests/s and generated tokens/s of three ways to serve one checkpoint, at 1, 8 and 32
concurrent chats, printed as one line of JSON on stdout.

    python bench/serve_throughput.py --model runs/speedrun-tiny/sft
    python bench/serve_throughput.py --model runs/d20 --concurrency 1,8,32,128 --requests 128 --dtype bfloat16 \\
        --device cuda --vllm-python .venv-vllm/bin/python

Paths:
* `vllm`: `python -m vllm.entrypoints.openai.api_server` with our native model (modeling_nanochat/engines), run by
  --vllm-python (vLLM lives in its own environment: README, Serve), prefix caching on (vLLM's default).
* `transformers_serve`: `python -m modeling_nanochat.apps.serve` (transformers' own server, our remote code).
* `generate`: our model's `generate()` in this process, the chats of one wave batched with left padding.
Each chat is a synthetic question under the checkpoint's chat template, answered greedily up to --max-tokens (a reply
ends at <|assistant_end|>, as in the app). A "wave" is --concurrency chats sent at once (servers: one thread each,
over HTTP on loopback); --requests chats go through in waves. tokens/s counts generated tokens (the servers' usage
figures; for generate, tokens up to and including the stop). Both servers are up for the whole run and the paths take
turns within every repeat, so a shared machine's load drifts over all alike; figures are medians of --repeats.
"""

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from modeling_nanochat import NanoChatForCausalLM  # noqa: E402
from modeling_nanochat.data import synthetic  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name, argv, log_dir, env=None, timeout=300):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc = subprocess.Popen([a.replace("{port}", str(self.port)) for a in argv], cwd=REPO,
                                     stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{name} did not come up; its log ({self.log_path}):\n"
                                 f"{self.log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def chat_over_http(url, model, question, max_tokens):
    body = dict(model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0)
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    return out["usage"]["completion_tokens"]


def server_wave(server, model, questions, max_tokens):
    with ThreadPoolExecutor(len(questions)) as pool:
        return sum(pool.map(lambda q: chat_over_http(server.url, model, q, max_tokens), questions))


@torch.no_grad()
def generate_wave(hf, tok, questions, max_tokens, stops):
    batch = tok.apply_chat_template([[{"role": "user", "content": q}] for q in questions], add_generation_prompt=True,
                                    padding=True, return_dict=True, return_tensors="pt")
    batch = {k: v.to(hf.device) for k, v in batch.items()}
    out = hf.generate(**batch, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops, pad_token_id=stops[-1])
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    return sum(next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in new)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "runs" / "speedrun-tiny" / "sft"), help="a saved chat model dir")
    ap.add_argument("--concurrency", default="1,8,32", help="chats in flight, comma-separated")
    ap.add_argument("--requests", type=int, default=32, help="chats per concurrency level and path")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"),
                    help="the Python of vLLM's environment")
    ap.add_argument("--paths", default="vllm,transformers_serve,generate", help="which paths to run")
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"error: {args.model} holds no model\n  fix: run the tiny speedrun (bash recipes/speedrun.sh "
                         "--preset tiny) or pass --model DIR")
    paths = args.paths.split(",")
    if "vllm" in paths and not Path(args.vllm_python).exists():
        raise SystemExit(f"error: {args.vllm_python} does not exist\n  fix: set up vLLM's environment (README, "
                         "Serve) or pass --vllm-python, or leave vllm out of --paths")
    levels = [int(c) for c in args.concurrency.split(",")]
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"  # generate's batches: the prompts end where generation starts
    rng = random.Random(0)
    questions = [synthetic.chat_question(rng)["question"] for _ in range(args.requests)]
    stops = [tok.convert_tokens_to_ids("<|assistant_end|>"), tok.convert_tokens_to_ids("<|bos|>")]

    servers = {}
    tmp = tempfile.mkdtemp(prefix="serve_bench_")
    try:
        if "vllm" in paths:
            log("starting vLLM ...")
            servers["vllm"] = Server("vllm", [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
                                              "--model", args.model, "--host", "127.0.0.1", "--port", "{port}",
                                              "--dtype", args.dtype, "--gpu-memory-utilization", "0.3"], tmp,
                                     env={"VLLM_CPU_KVCACHE_SPACE": "2"} if args.device == "cpu" else None)
        if "transformers_serve" in paths:
            log("starting transformers serve ...")
            servers["transformers_serve"] = Server(
                "transformers_serve", [sys.executable, "-m", "modeling_nanochat.apps.serve", args.model,
                                       "--host", "127.0.0.1", "--port", "{port}", "--device", args.device,
                                       "--dtype", args.dtype], tmp)
        hf = None
        if "generate" in paths:
            hf = NanoChatForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device).eval()
        runs = {p: {c: [] for c in levels} for p in paths}
        for r in range(args.repeats):
            for c in levels:
                for p in paths:
                    t0, tokens = time.perf_counter(), 0
                    for i in range(0, args.requests, c):
                        wave = questions[i: i + c]
                        tokens += generate_wave(hf, tok, wave, args.max_tokens, stops) if p == "generate" else \
                            server_wave(servers[p], args.model, wave, args.max_tokens)
                    dt = time.perf_counter() - t0
                    runs[p][c].append((args.requests / dt, tokens / dt))
                    log(f"repeat {r + 1}/{args.repeats} concurrency {c:>3} {p:>18}: {args.requests / dt:7.2f} req/s "
                        f"{tokens / dt:8.1f} tok/s")
    finally:
        for s in servers.values():
            s.stop()

    results = {p: {str(c): {"requests_per_s": statistics.median(x[0] for x in runs[p][c]),
                            "tokens_per_s": statistics.median(x[1] for x in runs[p][c])} for c in levels}
               for p in paths}
    if "generate" in paths:
        for p in paths:
            for c in levels:
                results[p][str(c)]["tokens_per_s_vs_generate"] = round(
                    results[p][str(c)]["tokens_per_s"] / results["generate"][str(c)]["tokens_per_s"], 3)
    print(json.dumps({"bench": "serve_throughput", "model": args.model, "device": args.device, "dtype": args.dtype,
                      "requests": args.requests, "max_tokens": args.max_tokens, "repeats": args.repeats,
                      "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                  "torch": torch.__version__}, "results": results}))


if __name__ == "__main__":
    main()
