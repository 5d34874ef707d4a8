"""CORE scoring with the shared few-shot prefix run once per example (core_scoring.Scorer(share_prefix=True)): the
same predictions and losses as every sequence scored alone, on every item of the sample bundle, and in padded
batches whose examples have different prefix lengths (left-padded prefixes, smear and sliding windows included)."""

import random

import pytest
import torch

from test_core import bundle, model, tokenizer  # noqa: F401 - the fixtures CORE's tests share
from evaluation.core import evaluate_core
from evaluation.core_bundle import load_bundle
from evaluation.core_prompts import ScoredSequence
from evaluation.core_scoring import Scorer, plan_shared_batches, shared_prefix_length, split_shared


def test_the_fixture_model_is_worth_testing(model):
    """The shared fixture model (test_core's): smear on and sliding-window layers, the parts prefix reuse can break."""
    assert float(model.model.smear_lambda.detach().abs()) > 0 and "sliding_attention" in model.config.layer_types


class _Counter:
    """Counts the model's forwards, those continuing a cache, and the input tokens (pads included)."""

    def __init__(self, model):
        self.calls = self.cached = self.tokens = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls += 1
        self.tokens += kwargs["input_ids"].numel()
        self.cached += kwargs.get("cache", kwargs.get("past_key_values")) is not None


def _assert_same(a: dict, b: dict, what: str) -> None:
    for task, records in a["items"].items():
        assert len(records) == len(b["items"][task]), task
        for k, (x, y) in enumerate(zip(records, b["items"][task])):
            where = f"{what}: {task}[{k}]"
            assert x["sequences"] == y["sequences"] and x["correct"] == y["correct"], where
            if "mean_losses" in x:
                assert x["pred"] == y["pred"], where
                assert y["mean_losses"] == pytest.approx(x["mean_losses"], abs=1e-4), where
            else:
                assert x["argmax"] == y["argmax"], where
    assert a["results"] == b["results"], what


@pytest.fixture
def one_thread():
    """Hundreds of small forwards: extra OpenMP threads only spin on a shared CI machine (see bench/core_throughput)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_shared_prefix_equals_one_by_one_on_every_item(model, tokenizer, bundle, one_thread):
    kw = dict(return_items=True, progress=False)
    alone = evaluate_core(model, tokenizer, bundle, batch_size=1, share_prefix=False, **kw)  # no padding at all
    runs = {}
    for name, extra in {"batched": dict(share_prefix=False), "shared": {},
                        "tight": dict(batch_size=3, max_batch_tokens=600)}.items():  # other batch shapes
        count = _Counter(model)
        try:
            runs[name] = evaluate_core(model, tokenizer, bundle, **extra, **kw), count
        finally:
            count.handle.remove()
    assert set(alone["items"]) == {s.label for s in load_bundle(bundle)}  # every task of the sample
    for name, (out, _) in runs.items():
        _assert_same(alone, out, name)
    # the prefix path ran (forwards that continue a cache), and it fed far fewer tokens than whole sequences
    plain, shared, tight = (runs[name][1] for name in ("batched", "shared", "tight"))
    assert plain.cached == 0 and shared.cached > 0 and tight.cached > shared.cached
    assert shared.tokens < 0.6 * plain.tokens


def _options(rng, prefix: int, suffixes: list[int], vocab: int, bos: int) -> list[ScoredSequence]:
    """Sequences sharing exactly `prefix` tokens (BOS first), each with its own tail, scored from a random point."""
    head = [bos] + [rng.randrange(vocab) for _ in range(prefix - 1)]
    firsts = rng.sample(range(vocab), len(suffixes))  # the options part right after the prefix
    out = []
    for first, n in zip(firsts, suffixes):
        tail = [first] + [rng.randrange(vocab) for _ in range(n - 1)]
        out.append(ScoredSequence(head + tail, prefix + rng.randrange(n), prefix + n))
    return out


def test_padded_batch_with_different_prefix_lengths(model, tokenizer):
    rng = random.Random(0)
    bos, vocab = tokenizer.convert_tokens_to_ids("<|bos|>"), len(tokenizer)
    # prefixes longer and shorter than the sliding window; suffixes of different lengths
    shapes = [(5, [3, 1, 4]), (40, [2, 7]), (17, [6, 6, 1, 2]), (2, [5, 3]), (90, [1, 1])]
    seqs, groups = [], []
    for g, (prefix, suffixes) in enumerate(shapes):
        seqs += _options(rng, prefix, suffixes, vocab, bos)
        groups += [g] * len(suffixes)
    seqs.append(ScoredSequence([bos] + [rng.randrange(vocab) for _ in range(30)], 20, 31))  # scored alone
    groups.append("lm")
    alone = Scorer(model, bos, "cpu", batch_size=1, share_prefix=False)
    expected = [alone.score([s])[0] for s in seqs]
    scorer = Scorer(model, bos, "cpu", batch_size=64, max_batch_tokens=100_000)
    got = scorer.score(seqs, groups=groups)
    assert scorer.forwards == scorer.n_batches(seqs, groups) == 3  # prefixes, suffixes, the lone sequence
    for i, (e, o) in enumerate(zip(expected, got)):
        assert o.argmax == e.argmax, i
        assert o.mean_loss == pytest.approx(e.mean_loss, abs=1e-4), i
    # the first scored token is predicted from the suffix forward: the prefix stops one token before it at most
    items, lone = split_shared(seqs, groups)
    assert lone == [len(seqs) - 1]
    for item, (prefix, _) in zip(items, shapes):
        assert item.prefix == min(prefix, min(seqs[i].start for i in item.members) - 1)
    assert shared_prefix_length([ScoredSequence([1, 2, 3, 4], 2, 4), ScoredSequence([1, 2, 3, 5], 3, 4)]) == 1
    # batching in smaller pieces (several prefix batches, forward count still predicted) gives the same answers
    small = Scorer(model, bos, "cpu", batch_size=3, max_batch_tokens=120)
    again = small.score(seqs, groups=groups)
    assert small.forwards == small.n_batches(seqs, groups) > 3
    assert [s.argmax for s in again] == [s.argmax for s in expected]
    assert [s.mean_loss for s in again] == pytest.approx([s.mean_loss for s in expected], abs=1e-4)


def test_shared_batch_limits():
    seqs = [ScoredSequence([0] * n, n - 1, n) for n in (10, 12, 12, 13, 30, 31)]
    items, _ = split_shared(seqs, [0, 0, 1, 1, 2, 2])
    assert [it.prefix for it in items] == [8, 10, 28]  # common prefix capped at min(start) - 1
    # longest prefix first; rows (options) and padded tokens of both forwards bounded; a lone example always fits
    assert [[it.prefix for it in b] for b in plan_shared_batches(items, seqs, 4, 1000)] == [[28, 10], [8]]
    assert [[it.prefix for it in b] for b in plan_shared_batches(items, seqs, 64, 60)] == [[28], [10, 8]]
    assert [[it.prefix for it in b] for b in plan_shared_batches(items, seqs, 1, 1)] == [[28], [10], [8]]


def test_models_without_cache_or_positions_keep_the_plain_path(tokenizer):
    class Plain(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, logits_to_keep=0, use_cache=None):
            raise AssertionError

    assert not Scorer(Plain(), 0, "cpu").share_prefix
    seqs = [ScoredSequence([0, 1, 2], 2, 3), ScoredSequence([0, 1, 3], 2, 3)]
    assert Scorer(Plain(), 0, "cpu").n_batches(seqs, [0, 0]) == 1


def test_gpt2_shares_prefix_through_transformers_cache(tmp_path, tokenizer, bundle):
    """A transformers model (learned positions, so prompts get cut; transformers' own DynamicCache): the same answers
    with and without the shared prefix, up to float rounding (left padding changes the reductions' order)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2))
    gpt2.eval()
    kw = dict(max_per_task=11, tasks=["arc_easy", "copa", "winograd"], progress=False, return_items=True)
    plain = evaluate_core(gpt2, tokenizer, bundle, share_prefix=False, **kw)
    count = _Counter(gpt2)
    try:
        shared = evaluate_core(gpt2, tokenizer, bundle, **kw)
    finally:
        count.handle.remove()
    assert count.cached > 0 and shared["cropped"]["arc_easy"] > 0  # the prefix path ran, on cut prompts too
    _assert_same(plain, shared, "gpt2")
