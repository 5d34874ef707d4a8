"""Chat RL (GRPO) on CPU with tiny models: the recipe end to end, the calculator during RL rollouts and its forced
tokens out of the loss, nanochat's reward (golden outputs of nanochat's own GSM8K reward, tests/fixtures/nanochat_grpo)
and nanochat's advantage r - mean(r) without a reference model."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, REPO, clean_env, perturbed_model, shared_path, tiny_config
from test_tool_generation import wired_model

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from modeling_nanochat import NanoChatForCausalLM  # noqa: E402
from modeling_nanochat.rl.prompts import gsm8k_prompt_dataset  # noqa: E402
from modeling_nanochat.rl.trainer import NanoChatGRPOTrainer, rl_muon_setup  # noqa: E402
from modeling_nanochat.rl.rollout import prompt_token_ids  # noqa: E402
from modeling_nanochat.rl.rewards import gsm8k_reward  # noqa: E402
from modeling_nanochat.tokenizer.tokenizer import (convert_nanochat_tokenizer, encode_ordinary, load_tokenizer,  # noqa: E402
                                            save_tokenizer, special_token_id)


@pytest.fixture(scope="module")
def tok():
    return convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))


def _args(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
              activation_checkpointing=False, logging_steps=1, max_steps=1, seed=0,
              beta=0.0, num_iterations=1, scale_rewards="none", loss_type="bnpo", temperature=1.0, top_k=50,
              num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=1,
              max_completion_length=16, shuffle_dataset=False)
    kw.update(overrides)
    return GRPOConfig(**kw)


def _questions(n):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is 1 + 2? ({i})"}], "answer": "#### 3"}
                              for i in range(n)])


@pytest.mark.slow
def test_recipe_runs_and_saves_a_loadable_checkpoint(tmp_path, tok):
    """recipes/grpo.py --config recipes/grpo/tiny_cpu.yaml: 2 optimizer steps on local GSM8K problems, HF checkpoint."""
    data = shared_path("gsm8k", "train_sample.jsonl")
    model_dir, out = tmp_path / "model", tmp_path / "rl"
    perturbed_model(tiny_config()).save_pretrained(model_dir)
    save_tokenizer(tok, str(model_dir))
    cmd = [sys.executable, str(REPO / "recipes" / "grpo.py"), "--config", str(REPO / "recipes/grpo/tiny_cpu.yaml"),
           "--model_name_or_path", str(model_dir), "--output_dir", str(out), "--data", str(data),
           "--save_strategy", "steps", "--save_steps", "2", "--save_only_model", "true"]
    run = subprocess.run(cmd, cwd=tmp_path, env=clean_env(TRL_EXPERIMENTAL_SILENCE="1", PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    steps = [h for h in state["log_history"] if "rewards/gsm8k_reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    # MuonAdamW at chat_rl's LRs x 0.05, linear to 0 over the 2 steps: the lm_head group (first) at 1 and 1/2
    lm_head_lr = 0.004 * (64 / 768) ** -0.5 * 0.05
    assert [h["learning_rate"] for h in steps] == pytest.approx([lm_head_lr, lm_head_lr / 2])
    # 2 questions x 4 samples per step on one process -> gradient_accumulation_steps derived as 8 / 2 = 4
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.gradient_accumulation_steps, args.steps_per_generation, args.generation_batch_size) == (4, 4, 8)

    loaded = NanoChatForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([prompt_token_ids(tok, "What is 1 + 2?")])
    assert torch.isfinite(loaded(ids).logits).all()
    assert (out / "token_bytes.pt").exists() and not (out / "chat_template.jinja").exists()
    assert load_tokenizer(str(out)).chat_template == tok.chat_template


def _rigged(tok, expression="1+2"):
    """A model that, after <|assistant_start|>, emits <|python_start|> 1 + 2 <|python_end|> and, after the tool's
    <|output_end|>, <|assistant_end|>: every wrong token is pushed to the bottom of the softcap (p ~ e^-30)."""
    model, _ = wired_model(lambda vocab: NanoChatForCausalLM(tiny_config(vocab_size=vocab)), tok, expression)
    with torch.no_grad():
        head = model.lm_head.weight
        used = (head > 0).any(0)
        head[:, used] = torch.where(head[:, used] > 0, 10.0, -10.0)
    return model


@pytest.mark.parametrize("rollout_rows", [None, 8], ids=["nanochat-passes", "questions-mixed"])
def test_tool_call_is_answered_and_forced_tokens_get_no_loss(tmp_path, tok, rollout_rows):
    """The calculator runs inside GRPO rollouts; its forced <|output_start|>3<|output_end|> (and the stop token) have
    zero weight in the loss the trainer differentiates; the advantage is r - mean(r) per question; no reference
    model. Both ways of sampling: one question per pass (nanochat's) and both questions' 8 rows in one pass."""
    pattern = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]  # rewards by position: two questions x 4 samples
    seen_texts = []

    def positional_reward(prompts, completions, completion_text, **kwargs):
        seen_texts.extend(completion_text)
        return pattern[:len(completions)]

    trainer = NanoChatGRPOTrainer(model=_rigged(tok), reward_funcs=[positional_reward], args=_args(tmp_path),
                                  train_dataset=_questions(2), processing_class=tok, rollout_rows=rollout_rows)
    passes = []
    rollout_passes = trainer.rollout_func._passes
    trainer.rollout_func._passes = lambda *a: [passes.append(p) or p for p in rollout_passes(*a)]
    assert trainer.beta == 0.0 and trainer.ref_model is None  # beta 0: no reference model is built

    captured = {}
    generate_and_score = trainer._generate_and_score_completions

    def spy(inputs):
        captured.update(generate_and_score(inputs))
        return captured

    trainer._generate_and_score_completions = spy
    trainer.train()

    sid = lambda t: special_token_id(tok, t)  # noqa: E731
    sampled = [sid("<|python_start|>"), *encode_ordinary(tok, "1+2"), sid("<|python_end|>")]
    forced = [sid("<|output_start|>"), *encode_ordinary(tok, "3"), sid("<|output_end|>")]
    expected = sampled + forced + [sid("<|assistant_end|>")]
    ids, mask = captured["completion_ids"], captured["completion_mask"] * captured["tool_mask"]
    assert ids.tolist() == [expected] * 8
    assert mask.tolist() == [[1] * len(sampled) + [0] * (len(forced) + 1)] * 8
    assert seen_texts == ["<|python_start|>1+2<|python_end|><|output_start|>3<|output_end|>"] * 8
    # nanochat: a pass per question, its 4 samples from one prompt; mixed: one pass of the 8 rows, two prompts
    assert [(len(prompt) if rollout_rows else 1, n) for prompt, n, _ in passes] == ([(8, 1)] if rollout_rows else
                                                                                    [(1, 4), (1, 4)])

    rewards = torch.tensor(pattern).view(2, 4)
    expected_adv = (rewards - rewards.mean(1, keepdim=True)).flatten()  # no division by the (non-zero) std
    torch.testing.assert_close(captured["advantages"], expected_adv)

    # d loss / d log p per token: what the trainer actually trains on. bnpo with one micro-batch of 8 rows:
    # -A / (valid tokens), nanochat's per-pass normalisation; exactly 0 on the forced tool output and the stop token.
    holder = {}
    logps_fn = trainer._get_per_token_logps_and_entropies

    def keep_logps(*args, **kwargs):
        logps, entropies, aux = logps_fn(*args, **kwargs)
        logps.retain_grad()
        holder["logps"] = logps
        return logps, entropies, aux

    trainer._get_per_token_logps_and_entropies = keep_logps
    trainer.compute_loss(trainer.model, captured).backward()
    weights = holder["logps"].grad
    expected_w = -expected_adv[:, None] * mask / mask.sum()
    torch.testing.assert_close(weights, expected_w)
    assert (weights[:, len(sampled):] == 0).all() and (weights[:, :len(sampled)] != 0).all()


@pytest.mark.parametrize("pad_to", [64, 1024], ids=["head-unpadded(TRL fused)", "head-padded(own log-softmax)"])
def test_trainer_log_probs_equal_the_models_own(tmp_path, tok, pad_to):
    """Per-token log-probs the trainer trains on equal log_softmax of our model's forward on the same left-padded
    batch (to 2e-6; a padded head's extra rows never enter the softmax), and so of each unpadded row alone. The
    second holds to fp32 kernel noise only: padded and unpadded rows run different matmul shapes, and on an
    AVX512 CPU log-probs near -20 then differ by ~1e-5 (6 ulps), on AVX2 by less."""
    torch.manual_seed(0)
    model = perturbed_model(tiny_config(pad_vocab_size_to=pad_to))
    trainer = NanoChatGRPOTrainer(model=model, reward_funcs=[gsm8k_reward], args=_args(tmp_path),
                                  train_dataset=_questions(1), processing_class=tok)
    prompts = [prompt_token_ids(tok, "What is 1 + 2?"), prompt_token_ids(tok, "Hi")]
    completions = [encode_ordinary(tok, "It is 3, of course."), encode_ordinary(tok, "Hello")]
    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width_p - len(p)) + p + c + [pad] * (width_c - len(c))
                        for p, c in zip(prompts, completions)])
    attention = torch.tensor([[0] * (width_p - len(p)) + [1] * (len(p) + len(c)) + [0] * (width_c - len(c))
                              for p, c in zip(prompts, completions)])
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, width_c)
        batch = torch.log_softmax(model(ids, attention_mask=attention).logits[:, width_p - 1:-1], -1)
        for row, (p, c) in enumerate(zip(prompts, completions)):
            same_batch = batch[row, :len(c)].gather(-1, torch.tensor(c)[:, None])[:, 0]
            torch.testing.assert_close(logps[row, :len(c)], same_batch, atol=2e-6, rtol=0)
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1]
            own = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
            torch.testing.assert_close(logps[row, :len(c)], own, atol=1e-5, rtol=1e-6)


def test_reward_equals_nanochats(tok):
    """gsm8k_reward on completions decoded as our rollout decodes them equals nanochat's GSM8K.reward (golden)."""
    cases = json.loads((FIXTURES / "nanochat_grpo" / "rewards.json").read_text())["cases"]
    texts = tok.batch_decode([c["completion_ids"] for c in cases], skip_special_tokens=False,
                             clean_up_tokenization_spaces=False)
    assert texts == [c["nanochat_text"] for c in cases]
    answers = [c["answer"] for c in cases]
    rewards = gsm8k_reward(prompts=[None] * len(cases), completions=[None] * len(cases), answer=answers,
                           completion_text=texts)
    assert rewards == [c["reward"] for c in cases]
    assert 0 < sum(rewards) < len(rewards)  # the golden set has both outcomes
    # the stock `trl grpo` path: conversational completions, no completion_text
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    assert gsm8k_reward(None, conversational, answers) == rewards


def test_gsm8k_prompts_and_rl_optimizer_groups():
    """Prompts in nanochat's (seed-42) order with the answer column; MuonAdamW groups at the RL LRs x 0.05."""
    data = shared_path("gsm8k", "train_sample.jsonl")
    rows = gsm8k_prompt_dataset(str(data), "train", limit=5)
    assert set(rows.column_names) == {"answer", "prompt"}
    from evaluation.tasks.common import HubSource
    from evaluation.tasks.gsm8k import GSM8K
    task = GSM8K(str(data), source=HubSource("openai/gsm8k", "main", "train"))
    assert [r["prompt"][0]["content"] for r in rows] == [task.rows[i]["question"] for i in range(5)]
    assert rows[0]["answer"] == task.rows[0]["answer"]

    model = NanoChatForCausalLM(tiny_config())
    setup = rl_muon_setup()
    groups = {g["name"]: g for g in setup.param_groups(model)}
    scale = (64 / 768) ** -0.5
    assert groups["lm_head"]["lr"] == pytest.approx(0.004 * scale * 0.05)
    assert groups["embedding"]["lr"] == pytest.approx(0.2 * scale * 0.05)
    assert groups["muon_64x64"]["lr"] == pytest.approx(0.02 * 0.05)
    assert all(g["initial_lr"] == g["lr"] for g in groups.values())
    assert all(g["weight_decay"] == 0.0 for g in groups.values() if g["kind"] == "muon")
    assert [setup.lr_schedule(s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]  # lrm = 1 - step / num_steps
    assert setup.muon_momentum is None  # Muon momentum stays the groups' 0.95
