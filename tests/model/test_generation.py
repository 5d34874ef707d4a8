"""generate() behaves as it does for transformers' own models: every cache type, decoding strategy and output option
gives the tokens that recomputing without a cache gives. Written for the transformers the suite runs on (the lock
and the newest release in CI); the remote-code lanes on 4.51/4.57 are tests/model/test_remote_code.py."""

import inspect
import warnings

import pytest
import torch

from conftest import perturbed_model, tiny_config
from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM
from modeling_nanochat.modeling_nanochat import NanoChatCache, NanoChatStaticCache

GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    return perturbed_model(tiny_config(), seed=2)  # this seed decodes varied tokens (no repeated-token loops)


def _prompt(n, seed=0, batch=1):
    return torch.randint(0, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


def _new(out, prompt):
    seqs = out.sequences if hasattr(out, "sequences") else out
    return seqs[:, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("n", [1, 7, 150])  # 150 > the 128-token short window
def test_cached_greedy_equals_recomputing(model, n):
    prompt = _prompt(n)
    cached = model.generate(prompt, max_new_tokens=12, **GREEDY)
    plain = model.generate(prompt, max_new_tokens=12, use_cache=False, **GREEDY)
    assert _new(cached, prompt) == _new(plain, prompt)
    assert len(set(_new(cached, prompt)[0])) > 4  # a varied continuation, not one token repeated


def test_sampling_with_a_seed_is_the_same_with_and_without_cache(model):
    prompt = _prompt(20)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        runs.append(_new(model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=50, temperature=1.0,
                                        use_cache=use_cache, eos_token_id=None, pad_token_id=0), prompt))
    assert runs[0] == runs[1]


def test_beam_search_with_and_without_cache(model):
    prompt = _prompt(40)
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, **GREEDY)
    assert model.generate(prompt, **kw).tolist() == model.generate(prompt, use_cache=False, **kw).tolist()


def test_left_padded_batch_equals_each_prompt_alone(model):
    a, b = _prompt(30, seed=1)[0], _prompt(9, seed=2)[0]
    batch = torch.stack([a, torch.cat([torch.zeros(21, dtype=torch.long), b])])
    mask = torch.stack([torch.ones(30, dtype=torch.long), torch.cat([torch.zeros(21), torch.ones(9)]).long()])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=10, **GREEDY)
    for row, seq in ((0, a), (1, b)):
        alone = model.generate(seq[None], max_new_tokens=10, use_cache=False, **GREEDY)
        assert out[row, -10:].tolist() == alone[0, -10:].tolist()


def test_scores_and_logits_in_the_returned_dict_equal_recomputing(model):
    prompt = _prompt(25)
    kw = dict(max_new_tokens=6, return_dict_in_generate=True, output_scores=True, output_logits=True, **GREEDY)
    cached, plain = model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw)
    assert cached.sequences.tolist() == plain.sequences.tolist()
    for got, want in zip(cached.logits, plain.logits):
        assert (got - want).abs().max().item() <= 1e-4
    for got, want in zip(cached.scores, plain.scores):
        assert torch.allclose(got, want, atol=1e-4)
    assert isinstance(_returned_cache(cached), NanoChatCache)


def _generate_cache_kwarg(model, cache):
    # generate() takes the cache as `cache` from transformers 5.25 on (as `past_key_values` before)
    return {"cache" if "cache" in inspect.signature(model.generate).parameters else "past_key_values": cache}


def _returned_cache(out):
    return out.cache if "cache" in out.__dataclass_fields__ else out.past_key_values


def test_continuing_from_a_returned_cache(model):
    prompt = _prompt(20)
    first = model.generate(prompt, max_new_tokens=5, return_dict_in_generate=True, **GREEDY)
    cache = _returned_cache(first)
    assert cache.smear_state is not None and cache.get_seq_length() == prompt.shape[1] + 4
    follow = torch.cat([first.sequences, _prompt(6, seed=9)], dim=1)  # the user's next message, say
    cont = model.generate(follow, max_new_tokens=8, **_generate_cache_kwarg(model, cache), **GREEDY)
    fresh = model.generate(follow, max_new_tokens=8, use_cache=False, **GREEDY)
    assert cont.tolist() == fresh.tolist()


@pytest.mark.parametrize("eos", [None, [5, 7]])
def test_eos_token_id_none_or_a_list_does_not_break_generate(eos):
    cfg = tiny_config()
    cfg.eos_token_id = eos
    model = perturbed_model(cfg, seed=2)
    stops = model.generation_config.eos_token_id
    assert None not in stops and cfg.bos_token_id in stops and all(t in stops for t in (eos or []))
    out = model.generate(_prompt(5), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 1 and 6 <= out.shape[1] <= 9


def test_static_cache_generate_equals_dynamic(model):
    prompt = _prompt(40)
    want = model.generate(prompt, max_new_tokens=10, **GREEDY).tolist()
    assert model.generate(prompt, max_new_tokens=10, cache_implementation="static", **GREEDY).tolist() == want
    # a padded batch through the masks generate() prepares ahead of the decode step
    batch = torch.cat([prompt, torch.cat([torch.zeros(1, 10, dtype=torch.long), prompt[:, :30]], 1)])
    mask = torch.ones_like(batch)
    mask[1, :10] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, **GREEDY)
    assert model.generate(batch, cache_implementation="static", **kw).tolist() == model.generate(batch, **kw).tolist()


def test_compiled_decode_step_with_a_static_cache_equals_eager(model):
    """The decode step as one graph (fullgraph=True: no break may hide a Python fallback), masks built outside as
    generate() builds them; ~10 s of compiling on CPU."""
    assert NanoChatForCausalLM._can_compile_fullgraph
    torch._dynamo.reset()
    prompt = _prompt(30)
    want = _new(model.generate(prompt, max_new_tokens=12, **GREEDY), prompt)[0]
    cache = NanoChatStaticCache(config=model.config, max_cache_len=64)
    step = torch.compile(model.forward, fullgraph=True)
    got = []
    with torch.no_grad():
        logits = model(prompt, cache=cache, use_cache=True).logits
        for i in range(12):
            token = logits[:, -1].argmax(-1, keepdim=True)
            got.append(token.item())
            pos = torch.tensor([[prompt.shape[1] + i]])
            masks = model.create_masks_for_generate(config=model.config, inputs_embeds=torch.empty(1, 1, 0),
                                                    attention_mask=None, cache=cache, position_ids=pos)
            logits = step(input_ids=token, position_ids=pos, cache=cache, use_cache=True, attention_mask=masks).logits
    assert got == want


@pytest.mark.parametrize("n", [20, 150])  # past the short window too
def test_prompt_lookup_and_assisted_decoding_equal_greedy(model, n):
    prompt = torch.cat([_prompt(n // 2), _prompt(n // 2)], dim=1)  # repeats give prompt lookup something to find
    want = model.generate(prompt, max_new_tokens=16, use_cache=False, **GREEDY).tolist()
    assert model.generate(prompt, max_new_tokens=16, prompt_lookup_num_tokens=3, **GREEDY).tolist() == want
    assistant = perturbed_model(tiny_config(depth=2), seed=5)
    assert model.generate(prompt, max_new_tokens=16, assistant_model=assistant, **GREEDY).tolist() == want


def test_cropping_rewinds_the_smear_state(model):
    prompt = _prompt(30)
    cache = NanoChatCache(config=model.config)
    with torch.no_grad():
        model(prompt[:, :20], cache=cache, use_cache=True)
        want = cache.smear_state.clone()
        model(prompt[:, 20:], cache=cache, use_cache=True)
        cache.crop(-10)
    assert cache.get_seq_length() == 20 and torch.equal(cache.smear_state, want)


def test_sliding_window_and_short_window_are_one_setting(tmp_path):
    cfg = tiny_config()
    assert cfg.sliding_window == cfg.short_window + 1
    cfg.sliding_window = 33
    assert cfg.short_window == 32
    cfg.short_window = 40
    assert cfg.sliding_window == 41
    cfg.save_pretrained(tmp_path)
    again = NanoChatConfig.from_pretrained(tmp_path)
    assert (again.short_window, again.sliding_window) == (40, 41)
    with pytest.raises(ValueError, match="sliding_window"):
        cfg.sliding_window = 0
    # the attention layers read the window from the config, so a live change reaches them and the caches
    model = perturbed_model(cfg, seed=2)
    model.config.sliding_window = 17
    prompt = _prompt(60)
    assert model.model.layers[0].self_attn.sliding_window == 17
    assert model.generate(prompt, max_new_tokens=8, **GREEDY).tolist() == \
        model.generate(prompt, max_new_tokens=8, use_cache=False, **GREEDY).tolist()
    with torch.no_grad():
        short = model(prompt).logits
    model.config.sliding_window = 41
    with torch.no_grad():
        assert not torch.allclose(model(prompt).logits, short)


def test_output_attentions_eager_or_a_clear_error(model):
    ids = _prompt(12)
    model.config._attn_implementation = "eager"
    try:
        out = model(ids, output_attentions=True)
        assert len(out.attentions) == model.config.num_hidden_layers
        assert out.attentions[0].shape == (1, model.config.num_attention_heads, 12, 12)
        assert torch.allclose(out.attentions[0].sum(-1), torch.ones(1, 4, 12), atol=1e-5)
        assert out.attentions[0][0, 0].triu(1).abs().max() == 0  # causal
    finally:
        model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="eager"):
        model(ids, output_attentions=True)


def test_inputs_embeds_alone_is_a_clear_error(model):
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.randn(1, 3, model.config.hidden_size))


@pytest.mark.parametrize("kwargs", [dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5}),
                                    dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
                                    dict(rope_scaling={"type": "dynamic", "factor": 2.0})])
def test_rope_scaling_is_refused_not_ignored(kwargs):
    with pytest.raises(ValueError, match="RoPE scaling is not supported"):
        NanoChatConfig(depth=2, **kwargs)


def test_rope_theta_can_be_set_as_servers_do():
    cfg = tiny_config()
    cfg.rope_theta = 50_000
    assert cfg.rope_parameters["rope_theta"] == 50_000.0 == cfg.rope_theta


def test_no_deprecation_warnings_from_our_code(model):
    """transformers 5.25 deprecates `past_key_values` (gone in 5.40): generate(), a forward with a cache and the
    tool-use loop must speak the current names."""
    from transformers.utils import logging as hf_logging
    from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer
    from modeling_nanochat.generation.tool_use import generate as tool_generate
    from conftest import FIXTURES

    messages = []
    handler = _ListHandler(messages)
    hf_logging.get_logger().addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            prompt = _prompt(20)
            model.generate(prompt, max_new_tokens=4, **GREEDY)
            model.generate(prompt, max_new_tokens=4, cache_implementation="static", **GREEDY)
            out = model(prompt, use_cache=True)
            from modeling_nanochat.generation.hf_cache import cache_kwargs, output_cache
            model(_prompt(1), use_cache=True, position_ids=torch.tensor([[20]]), **cache_kwargs(model, output_cache(out)))
            tok = convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))
            big = perturbed_model(tiny_config(vocab_size=len(tok)), seed=2)
            for _ in zip(range(5), tool_generate(big, tok, prompt[0].tolist(), num_samples=2, max_tokens=5)):
                pass
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert not [m for m in messages if "deprecat" in m.lower() and "cache" in m.lower()], messages


class _ListHandler(__import__("logging").Handler):
    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def emit(self, record):
        self.sink.append(record.getMessage())
