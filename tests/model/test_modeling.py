"""The model itself: depth dial, nanochat golden parity, transformers' own nanochat, HF conventions."""

import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES, perturbed_model, tiny_config
from modeling_nanochat import NanoChatCache, NanoChatConfig, NanoChatForCausalLM
from modeling_nanochat.checkpoints.convert import load_nanochat_checkpoint

# Reference §2.6 (verified there against nanochat's GPT on the meta device): V=32768, T=2048, SSSL.
PARAM_TABLE = {
    4: dict(dim=256, heads=2, ve_layers=[1, 3], wte=8_388_608, value_embeds=16_777_216,
            matrices=3_145_776, scalars=34, total=36_700_242, scaling=11_534_384),
    12: dict(dim=768, heads=6, ve_layers=list(range(1, 12, 2)), wte=25_165_824, value_embeds=150_994_944,
             matrices=84_935_088, scalars=50, total=286_261_730, scaling=110_100_912),
    20: dict(dim=1280, heads=10, ve_layers=list(range(1, 20, 2)), wte=41_943_040, value_embeds=419_430_400,
             matrices=393_217_200, scalars=66, total=896_533_746, scaling=435_160_240),
    24: dict(dim=1536, heads=12, ve_layers=list(range(1, 24, 2)), wte=50_331_648, value_embeds=603_979_776,
             matrices=679_478_976, scalars=74, total=1_384_122_122, scaling=729_810_624),
    26: dict(dim=1664, heads=13, ve_layers=list(range(1, 26, 2)), wte=54_525_952, value_embeds=708_837_376,
             matrices=863_897_580, scalars=78, total=1_681_786_938, scaling=918_423_532),
}


@pytest.mark.parametrize("depth", sorted(PARAM_TABLE))
def test_depth_dial_matches_reference_table(depth):
    want = PARAM_TABLE[depth]
    cfg = NanoChatConfig(depth=depth)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == \
        (want["dim"], want["heads"], want["heads"], 128)
    assert cfg.value_embed_layers == want["ve_layers"]
    assert cfg.sliding_window == 513 and cfg.short_window == 512  # S = 512 left keys at T = 2048
    assert cfg.layer_types[-1] == "full_attention"
    with torch.device("meta"):
        model = NanoChatForCausalLM(cfg)
    counts = {"wte": 0, "value_embeds": 0, "lm_head": 0, "matrices": 0, "scalars": 0}
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight":
            counts["wte"] += p.numel()
        elif name.startswith("model.value_embeds."):
            counts["value_embeds"] += p.numel()
        elif name == "lm_head.weight":
            counts["lm_head"] += p.numel()
        elif name.startswith("model.layers."):
            counts["matrices"] += p.numel()
        else:
            counts["scalars"] += p.numel()
    assert counts["wte"] == counts["lm_head"] == want["wte"]
    assert counts["value_embeds"] == want["value_embeds"]
    assert counts["matrices"] == want["matrices"]
    assert counts["scalars"] == want["scalars"]
    assert sum(counts.values()) == want["total"]
    assert counts["matrices"] + counts["lm_head"] == want["scaling"]


def test_d26_window_layout_and_config_reload(tmp_path):
    cfg = NanoChatConfig(depth=26)
    letters = "".join("S" if t == "sliding_attention" else "L" for t in cfg.layer_types)
    assert letters == "SSSL" * 6 + "SL"
    cfg.save_pretrained(tmp_path)
    again = NanoChatConfig.from_pretrained(tmp_path)
    for key in ("hidden_size", "num_attention_heads", "layer_types", "sliding_window", "value_embed_layers",
                "rope_parameters", "rms_norm_eps", "final_logit_softcapping", "qk_norm_scale", "depth"):
        assert getattr(again, key) == getattr(cfg, key), key
    assert again.rms_norm_eps == torch.finfo(torch.float32).eps  # nanochat's eps=None, not 1e-6


@pytest.mark.parametrize("kwargs, message", [
    (dict(depth=4, hidden_size=250, num_attention_heads=2, head_dim=128), "num_attention_heads\\*head_dim"),
    (dict(depth=4, num_attention_heads=2, num_key_value_heads=3, hidden_size=256), "multiple of"),
    (dict(depth=4, window_pattern="SXL"), "only 'S'"),
    (dict(depth=4, value_embed_layers=[7]), "outside"),
    (dict(depth=4, layer_types=["full_attention"] * 4), "layer_types"),
    (dict(depth=4, sliding_window=100), "sliding_window"),
    (dict(depth=4, num_hidden_layers=5), "disagree"),
    (dict(depth=4, hidden_act="silu"), "relu2"),
    (dict(depth=4, tie_word_embeddings=True), "untie"),
])
def test_inconsistent_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NanoChatConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# golden parity with nanochat's own code (fixtures: tests/fixtures/README.md)

ERAS = [("nanochat_current", None, "2026-03-14"), ("nanochat_jan2026", "2026-01", "2026-01"),
        ("nanochat_oct2025", None, "2025-10")]


def _golden_model(dirname, arch):
    state, config, _, era = load_nanochat_checkpoint(FIXTURES / dirname, arch=arch)
    model = NanoChatForCausalLM(config).eval()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model, era, torch.load(FIXTURES / dirname / "golden.pt")


@pytest.mark.parametrize("dirname, arch, era", ERAS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_match_nanochat(dirname, arch, era, impl):
    model, got_era, golden = _golden_model(dirname, arch)
    assert got_era == era
    model.config._attn_implementation = impl
    with torch.no_grad():
        logits = model(golden["input_ids"]).logits
    assert golden["input_ids"].shape[1] > model.config.short_window + 1 or model.config.window_pattern is None
    assert (logits - golden["logits"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dirname, arch, era", ERAS)
def test_greedy_decoding_matches_nanochat(dirname, arch, era):
    model, _, golden = _golden_model(dirname, arch)
    cases = [("prompt", "greedy_naive")]
    if "long_prompt" in golden:  # current era: 150-token prompt, decoding crosses the 128-token short window
        cases += [("long_prompt", "greedy_long_naive")]
    for prompt_key, want_key in cases:
        prompt, want = golden[prompt_key][None], golden[want_key]
        for use_cache in (True, False):
            out = model.generate(prompt, max_new_tokens=len(want), do_sample=False, use_cache=use_cache,
                                 eos_token_id=None, pad_token_id=0)
            assert out[0, prompt.shape[1]:].tolist() == want.tolist(), (prompt_key, use_cache)
        if want_key == "greedy_naive" and "greedy_engine" in golden:
            assert golden["greedy_engine"].tolist() == want.tolist()  # nanochat's Engine agrees with its naive loop


def test_generate_uses_nanochat_cache_with_smear_state():
    model = perturbed_model(tiny_config())
    out = model.generate(torch.randint(0, 500, (1, 10)), max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    assert isinstance(out.past_key_values, NanoChatCache)
    assert out.past_key_values.smear_state is not None and out.past_key_values.smear_state.shape == (1, 1, 64)


# ---------------------------------------------------------------------------------------------------------------
# transformers' own Oct-2025 nanochat


def test_equals_transformers_builtin_nanochat(tmp_path):
    from transformers import NanoChatConfig as HFConfig, NanoChatForCausalLM as HFModel
    from modeling_nanochat.checkpoints.convert import convert, load_transformers_nanochat
    torch.manual_seed(0)
    hf = HFModel(HFConfig(vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randint(0, 300, (2, 60))
    with torch.no_grad():
        want = hf(x).logits
    state, config = load_transformers_nanochat(tmp_path / "hf")
    ours = NanoChatForCausalLM(config).eval()
    ours.load_state_dict(state)
    with torch.no_grad():
        assert (ours(x).logits - want).abs().max().item() <= 1e-5
    # and through the command-line converter, both ways
    convert(str(tmp_path / "hf"), str(tmp_path / "ours"))
    again = NanoChatForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (again(x).logits - want).abs().max().item() <= 1e-5
    convert(str(tmp_path / "ours"), str(tmp_path / "back"), to="transformers-nanochat")
    back = HFModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (back(x).logits - want).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# HF conventions


def test_flattened_sequences_match_each_alone():
    """TGI/vLLM send several sequences flattened into one row, position_ids restarting, no cache."""
    model = perturbed_model(tiny_config())
    seqs = [torch.randint(0, 500, (n,)) for n in (37, 150, 9)]  # 150 > the 128-token short window
    flat = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    for impl in ("sdpa", "eager"):
        model.config._attn_implementation = impl
        with torch.no_grad():
            joint = model(flat, position_ids=pos, use_cache=False).logits[0]
            start = 0
            for s in seqs:
                alone = model(s[None], use_cache=False).logits[0]
                assert (joint[start:start + len(s)] - alone).abs().max().item() <= 1e-4, impl
                start += len(s)


def test_smear_restarts_at_padding_and_batched_generation_equals_single():
    model = perturbed_model(tiny_config())
    a, b = torch.randint(0, 500, (12,)), torch.randint(0, 500, (5,))
    pad = 0
    batch = torch.stack([a, torch.cat([torch.full((7,), pad), b])])
    mask = torch.stack([torch.ones(12, dtype=torch.long), torch.cat([torch.zeros(7), torch.ones(5)]).long()])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad,
                         eos_token_id=None)
    for row, seq in ((0, a), (1, b)):
        alone = model.generate(seq[None], max_new_tokens=8, do_sample=False, pad_token_id=pad, eos_token_id=None)
        assert out[row, -8:].tolist() == alone[0, -8:].tolist()


def test_beam_search_keeps_smear_state_aligned():
    model = perturbed_model(tiny_config())
    prompt = torch.randint(0, 500, (1, 15))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert model.generate(prompt, **kw).tolist() == model.generate(prompt, use_cache=False, **kw).tolist()


def test_generation_past_the_long_window_matches_full_forward():
    """nanochat's L layers slide at sequence_len too; cache (sliding S layers) == recomputing without cache."""
    model = perturbed_model(tiny_config(max_position_embeddings=64, short_window=16))
    assert model.config.long_window == 64 and model.config.sliding_window == 17
    prompt = torch.randint(0, 500, (1, 50))
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert model.generate(prompt, **kw).tolist() == model.generate(prompt, use_cache=False, **kw).tolist()


def test_labels_loss_logits_to_keep_and_gradient_checkpointing():
    model = perturbed_model(tiny_config())
    ids = torch.randint(0, 500, (2, 40))
    labels = ids.clone()
    labels[:, :10] = -100
    out = model(ids, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, want, atol=1e-6)
    assert out.logits.abs().max() <= model.config.final_logit_softcapping
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 512) and torch.allclose(last[:, 0], out.logits[:, -1], atol=1e-4)
    model.train()
    model.zero_grad()
    model(ids, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in plain.values()), "every parameter must receive gradient"
    model.gradient_checkpointing_enable()
    model.zero_grad()
    model(ids, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-5), n


def test_init_follows_nanochat():
    cfg = tiny_config()
    model = NanoChatForCausalLM(cfg)
    m = model.model
    assert m.smear_lambda.item() == 0 and abs(m.backout_lambda.item() - 0.2) < 1e-7
    assert torch.allclose(m.resid_lambdas, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    assert torch.allclose(m.x0_lambdas, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert m.layers[0].self_attn.o_proj.weight.abs().sum() == 0 and m.layers[0].mlp.fc2.weight.abs().sum() == 0
    assert abs(m.embed_tokens.weight.std().item() - 0.8) < 0.05
    assert abs(model.lm_head.weight.std().item() - 0.001) < 1e-4
    bound = 3 ** 0.5 / 64 ** 0.5
    assert m.layers[0].self_attn.q_proj.weight.abs().max() <= bound
    assert m.layers[0].mlp.fc1.weight.abs().max() <= 0.4 * bound
    assert 0 <= m.smear_gate.weight.min() and m.smear_gate.weight.max() <= 0.02


def test_smear_is_dropped_not_leaked_on_tgi_decode_steps():
    """TGI decode sends one token per sequence (positions may happen to be consecutive) with cu_seqlen_prefill=None."""
    model = perturbed_model(tiny_config())
    x = torch.randn(1, 2, 64)
    pos = torch.tensor([[5, 6]])
    smeared = model.model._smear(x, pos, None, None)
    assert not torch.allclose(smeared[0, 1], x[0, 1])  # as one sequence, token 2 mixes in token 1
    decode = model.model._smear(x, pos, None, None, server_decode=True)
    assert torch.equal(decode, x)


def test_flex_attention_matches_nanochat():
    """flex_attention builds its block mask from the same mask functions (windows, causality); CPU compile ~15 s."""
    model, _, golden = _golden_model("nanochat_current", None)
    model.config._attn_implementation = "flex_attention"
    with torch.no_grad():
        logits = model(golden["input_ids"]).logits
    assert (logits - golden["logits"]).abs().max().item() <= 1e-4


def test_ids_from_the_wrong_tokenizer_are_a_clear_error():
    model = perturbed_model(tiny_config())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, 9999]]))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_shared_window_masks_equal_the_mask_factory(impl):
    """Whole unpadded rows (scoring) take `_window_masks` (one additive mask per window, or none) under sdpa; the
    same rows with an all-ones attention_mask go through transformers' factory. Past both windows they agree."""
    model = perturbed_model(tiny_config(max_position_embeddings=48, short_window=24), seed=5)  # windows 24, 48
    model.config._attn_implementation = impl
    ids = torch.randint(0, 500, (3, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(ids, use_cache=False).logits
        factory = model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        short = model(ids[:, :20], use_cache=False).logits  # inside both windows: no mask at all
    torch.testing.assert_close(fast, factory, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(short, factory[:, :20], atol=1e-4, rtol=1e-4)
    from modeling_nanochat import modeling_nanochat as mn
    masks = mn._window_masks(model.config, torch.zeros(1, 70, 8))
    assert all(m is not None and m.shape == (1, 1, 70, 70) for m in masks.values())
    assert all(m is None for m in mn._window_masks(model.config, torch.zeros(1, 20, 8)).values())
