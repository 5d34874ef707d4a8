"""Static-cache, compiled decoding (generation/static_decode.py) gives the eager path's tokens, compiles once."""

import pytest
import torch
from conftest import perturbed_model, tiny_config

from modeling_nanochat.generation import static_decode
from modeling_nanochat.generation.tool_use import generate
from modeling_nanochat.modeling_nanochat import NanoChatStaticCache
from modeling_nanochat.tokenizer.tokenizer import SPECIAL_TOKENS


class _Tok:
    """Specials at ids the model cannot emit: every row runs all max_tokens steps, no tool call fires."""

    def __len__(self):
        return 512

    def convert_tokens_to_ids(self, token):
        return -1 - SPECIAL_TOKENS.index(token)

    def convert_ids_to_tokens(self, i):
        return SPECIAL_TOKENS[-1 - i]

    unk_token_id = None


@pytest.fixture(scope="module")
def model():
    # windows of 24 (short) and 48 (long) tokens: a 20-token prompt and 40 new tokens cross both
    return perturbed_model(tiny_config(max_position_embeddings=48, short_window=24), seed=3)


def _tokens(model, rows, compile, n=40, **kw):
    prompt = list(range(5, 25))
    return [col for col, _ in generate(model, _Tok(), prompt, rows, max_tokens=n, temperature=0.0, compile=compile,
                                       **kw)]


class _CountingBackend:
    """A torch.compile backend that runs the traced graph as is and counts how many graphs were compiled."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("rows", [1, 3])
def test_static_compiled_tool_loop_equals_eager_and_compiles_once(model, rows, monkeypatch):
    """The traced step (dynamo, fullgraph-able) across both windows: same greedy tokens, and one graph for all 40
    steps: a per-token recompile (transformers' sliding static layer guards on a Python int) would show here."""
    torch._dynamo.reset()
    backend = _CountingBackend()
    monkeypatch.setattr(static_decode, "_compiled", {})
    monkeypatch.setattr(static_decode, "compiled_forward", lambda m: torch.compile(m.forward, backend=backend,
                                                                                   fullgraph=True, dynamic=False))
    assert _tokens(model, rows, compile=True) == _tokens(model, rows, compile=False)
    assert backend.graphs == 1


def test_prompts_of_other_lengths_reuse_the_compiled_step(model, monkeypatch):
    """ChatCORE decodes problem after problem at batch 1: a new prompt length must not compile anew (the smear state
    once kept the prefill's strides, (T*C, C, 1), and every prompt length recompiled)."""
    torch._dynamo.reset()
    backend = _CountingBackend()
    step = torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=False)
    monkeypatch.setattr(static_decode, "compiled_forward", lambda m: step)
    for length in (7, 11, 20):
        prompt = list(range(5, 5 + length))
        ours = [c for c, _ in generate(model, _Tok(), prompt, 1, max_tokens=6, temperature=0.0, compile=True)]
        assert ours == [c for c, _ in generate(model, _Tok(), prompt, 1, max_tokens=6, temperature=0.0,
                                               compile=False)]
    assert backend.graphs == 1


def test_inductor_compiled_rows_equal_eager(model):
    """The real compiler (inductor), with the prompt's cache copied to two rows; sampled rows use one generator
    alike, so a seeded sampling run matches too."""
    torch._dynamo.reset()
    assert _tokens(model, 2, compile=True) == _tokens(model, 2, compile=False)
    sampled = [col for col, _ in generate(model, _Tok(), list(range(5, 25)), 2, max_tokens=12, temperature=1.0,
                                          seed=7, compile=True)]
    assert sampled == [col for col, _ in generate(model, _Tok(), list(range(5, 25)), 2, max_tokens=12,
                                                  temperature=1.0, seed=7, compile=False)]


def test_the_switch(monkeypatch):
    monkeypatch.delenv(static_decode.ENV, raising=False)
    assert not static_decode.compile_enabled()
    monkeypatch.setenv(static_decode.ENV, "1")
    assert static_decode.compile_enabled() and not static_decode.compile_enabled(False)
    assert static_decode.cache_length(10) == 256 and static_decode.cache_length(300) == 512


def test_static_cache_has_no_sliding_layers_and_matches_dynamic_past_the_windows(model):
    """generate(cache_implementation="static") past both windows: our static cache keeps full-length layers (the
    window is in the masks), and the tokens equal the dynamic cache's."""
    cache = NanoChatStaticCache(config=model.config, max_cache_len=64)
    assert not any(cache.is_sliding)
    prompt = torch.arange(5, 25)[None]
    kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert model.generate(prompt, cache_implementation="static", **kw).tolist() == \
        model.generate(prompt, **kw).tolist()


def test_concurrent_compiled_loops_of_different_batch_sizes(model, monkeypatch):
    """The app decodes several chats from threads: compiled loops of two shapes at once, their later steps skipping
    dynamo's guard checks, still give each its own eager tokens."""
    from concurrent.futures import ThreadPoolExecutor

    torch._dynamo.reset()
    monkeypatch.setattr(static_decode, "_compiled", {})
    backend = _CountingBackend()
    monkeypatch.setattr(static_decode, "compiled_forward", lambda m: torch.compile(m.forward, backend=backend,
                                                                                   dynamic=False))
    want = {rows: _tokens(model, rows, compile=False) for rows in (1, 3)}
    with ThreadPoolExecutor(2) as pool:
        jobs = [(rows, pool.submit(_tokens, model, rows, True)) for rows in (1, 3, 1, 3)]
        assert all(f.result() == want[rows] for rows, f in jobs)


def test_a_first_step_waits_while_another_loop_skips_guards(model, monkeypatch):
    """The step lock's reason, forced: loop A is held inside a later step (guard checks skipped, a process-wide
    stance) while loop B of another batch size takes its first step. Without the lock B's first step runs under A's
    stance and fails ("Recompilation triggered with skip_guard_eval_unsafe stance"); with it B waits for A."""
    import threading

    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend=_CountingBackend(), dynamic=False)
    a_inside, b_done = threading.Event(), threading.Event()

    a_steps = []

    def step(**kw):
        if kw["input_ids"].shape[0] == 1:
            a_steps.append(1)
            if len(a_steps) == 2:  # A's second step: the first one that skips the guard checks
                a_inside.set()  # give B time to start its first step meanwhile
                b_done.wait(timeout=2)
        return compiled(**kw)

    monkeypatch.setattr(static_decode, "compiled_forward", lambda m: step)
    want_b = _tokens(model, 2, compile=False, n=4)
    results = {}

    def loop_a():
        results["a"] = _tokens(model, 1, compile=True, n=6)

    def loop_b():
        a_inside.wait(timeout=5)
        try:
            results["b"] = _tokens(model, 2, compile=True, n=4)
        except Exception as e:  # unlocked: A's graph on B's inputs
            results["b"] = repr(e)
        b_done.set()

    threads = [threading.Thread(target=loop_a), threading.Thread(target=loop_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert a_inside.is_set()  # the race really happened
    assert results["b"] == want_b
    assert results["a"] == _tokens(model, 1, compile=False, n=6)
