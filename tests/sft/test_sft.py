"""Chat SFT (recipes/sft.py, modeling_nanochat/sft_*.py, trl_optim.py) on CPU with a tiny model.

* a packed batch equals nanochat's §5.5 packing, rebuilt here from the spec by a plain reference implementation;
* GSM8K's tool-part conversion, the train/val mixture order and the rendered tokens equal nanochat's own task code
  (tests/fixtures/nanochat_sft/golden.json, see tests/fixtures/README.md);
* MuonAdamW is the optimizer with nanochat's SFT groups, LRs and schedules, warm-started from the pretraining
  optimizer state when it fits and refused with a reason when it does not;
* the recipe runs end to end on local conversations with tool calls (1 process, with ChatCORE; a resume from its
  mid-run checkpoint ends with the same weights) and on 2 real gloo processes (DDP path and nanochat's sharded
  optimizer: the same weights, checkpoints saved without hanging); the saved model loads with from_pretrained;
  offline without local data the recipe stops at once with a clear message.
"""

import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import FIXTURES, REPO, perturbed_model, shared_path, tiny_config

from modeling_nanochat.checkpoints.handover import PretrainHandover
from modeling_nanochat.checkpoints.training_state import checkpoint_path, save_checkpoint
from modeling_nanochat.optim.muon_adamw import MuonAdamW, build_param_groups
from modeling_nanochat.pretrain.trainer import publish_final_model
from modeling_nanochat.sft.collator import PackedSFTCollator, plan_epoch
from modeling_nanochat.sft.data import SOURCES, build_sft_mixture, load_source_rows
from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer, special_token_id
from modeling_nanochat.optim.trainer_mixin import load_optimizer_state, unwrap_optimizer

SFT = FIXTURES / "nanochat_sft"
IDENTITY = SFT / "identity.jsonl"  # includes assistant turns with python / python_output parts
T, B = 256, 4  # tiny_config has 256 positions


@pytest.fixture(scope="module")
def tokenizer():
    return convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, tokenizer):
    """A fake pretraining run as recipes/pretrain.py writes it: checkpoint-2/ (model + training_state with a used
    MuonAdamW state) and the final model at the root."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    bos, eos = (special_token_id(tokenizer, t) for t in ("<|bos|>", "<|assistant_end|>"))
    model = perturbed_model(tiny_config(bos_token_id=bos, eos_token_id=eos, pad_token_id=bos))
    opt = MuonAdamW(build_param_groups(model, embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02,
                                       weight_decay=0.1))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 0.01
        opt.step()
    ckpt = checkpoint_path(str(out), 2)
    handover = PretrainHandover(max_seq_len=T, device_batch_size=B, total_batch_size=2 * B * T,
                                base_lrs={"embedding": 0.3, "unembedding": 0.008, "matrix": 0.02, "scalar": 0.5},
                                optimizer="muonadamw", distributed_type="NO", step=2)
    save_checkpoint(ckpt, model=model, tokenizer=tokenizer, optimizer_state=opt.state_dict(), loader_states=[{}],
                    trainer_state={"step": 2, "world_size": 1}, handover=handover)
    publish_final_model(ckpt, str(out))
    return out


@pytest.fixture(scope="module")
def mixture(tokenizer):
    return build_sft_mixture(tokenizer, "train", data_dir=SFT / "data", extra_jsonl=[f"{IDENTITY}:2"],
                             max_tokens=T + 1)


# ----------------------------------------------------------------------------------------------------------------
# 1. packing: the spec, implemented independently


def reference_batches(mixture, bos, batch_size, seq_len, rank, world, buffer_size):
    """nanochat §5.5 in the most direct form: yields (inputs, targets, epoch_done) per micro-batch of one rank."""
    n, cursor, consumed, buffer = len(mixture), rank, rank, []
    while True:
        inputs, targets = [], []
        for _ in range(batch_size):
            row, mask = [], []
            content = None
            while len(row) < seq_len + 1:
                while len(buffer) < buffer_size:
                    buffer.append(mixture[cursor])
                    cursor += world
                    if cursor >= n:
                        cursor %= n
                remaining = seq_len + 1 - len(row)
                best, best_len = -1, 0
                for i, (ids, _) in enumerate(buffer):
                    if best_len < len(ids) <= remaining:
                        best, best_len = i, len(ids)
                if best < 0:
                    content = len(row)
                    row += [bos] * remaining
                    mask += [0] * remaining
                    break
                ids, m = buffer.pop(best)
                row += list(ids)
                mask += list(m)
                consumed += world
            x = row[:-1]
            y = [tok if keep else -100 for tok, keep in zip(row[1:], mask[1:])]
            if content is not None:
                y[content - 1:] = [-100] * (len(y) - content + 1)
            inputs.append(x)
            targets.append(y)
        yield torch.tensor(inputs), torch.tensor(targets), consumed >= n


@pytest.mark.parametrize("world,buffer_size", [(1, 100), (2, 100), (2, 5)])
def test_packed_batches_equal_the_spec(mixture, tokenizer, world, buffer_size):
    bos = special_token_id(tokenizer, "<|bos|>")
    plan = plan_epoch(mixture.lengths, batch_size=B, row_capacity=T + 1, world_size=world, grad_accum_steps=2,
                      buffer_size=buffer_size)
    collate = PackedSFTCollator(mixture, bos, T)
    global_rows = plan.global_rows()
    epoch_end = []
    for rank in range(world):
        ref = reference_batches(mixture, bos, B, T, rank, world, buffer_size)
        for k in range(plan.micro_batches):
            x, y, done = next(ref)
            if done:
                epoch_end.append(k + 1)
            rows = plan.rows[rank][k * B:(k + 1) * B]
            assert rows == global_rows[(k * world + rank) * B:(k * world + rank + 1) * B]  # how ranks get them
            batch = collate([{"conversations": r} for r in rows])
            assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: causal over the row
            assert torch.equal(batch["input_ids"], x)
            assert torch.equal(batch["labels"], y)
            assert torch.equal(batch["position_ids"], torch.arange(T).repeat(B, 1))
    # the epoch ends after the first micro-batch in which some rank has consumed the whole mixture, rounded up to
    # whole optimizer steps (2 micro-batches each here)
    assert plan.epoch_micro_batches == min(epoch_end)
    assert plan.micro_batches == -(-plan.epoch_micro_batches // 2) * 2
    # something was actually packed: several conversations share rows, and rows end in padding
    assert max(len(r) for r in plan.rows[0]) >= 2
    assert any(sum(mixture.lengths[i] for i in r) < T + 1 for r in plan.rows[0])


def test_conversations_in_a_row_attend_to_each_other(mixture, tokenizer):
    bos = special_token_id(tokenizer, "<|bos|>")
    plan = plan_epoch(mixture.lengths, batch_size=B, row_capacity=T + 1)
    rows = plan.rows[0][:B]
    batch = PackedSFTCollator(mixture, bos, T)(rows)
    row = next(i for i, r in enumerate(rows) if len(r) >= 2)
    second = int(mixture.lengths[rows[row][0]])  # where the row's second conversation starts
    model = perturbed_model(tiny_config())
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        plain = model(input_ids=batch["input_ids"]).logits  # one causal sequence, positions 0..T-1
        changed_ids = batch["input_ids"].clone()
        changed_ids[row, 1:second] = (changed_ids[row, 1:second] + 7) % 400  # edit the first conversation only
        changed = model(input_ids=changed_ids, position_ids=batch["position_ids"]).logits
    assert torch.equal(packed, plain)
    assert torch.equal(changed[row, :1], packed[row, :1])  # causal: the position before the edit is untouched
    assert (changed[row, second:] - packed[row, second:]).abs().max() > 1e-3  # the second conversation sees the first


# ----------------------------------------------------------------------------------------------------------------
# 2. data: golden outputs of nanochat's own task code


def _sha(ids, mask):
    return hashlib.sha256(json.dumps([list(map(int, ids)), list(map(int, mask))]).encode()).hexdigest()


def test_gsm8k_tool_parts_and_mixture_order_match_nanochat(tokenizer, tmp_path):
    golden = json.loads((SFT / "golden.json").read_text())
    data = tmp_path / "data"
    shutil.copytree(SFT / "data", data)
    shutil.copy(shared_path("gsm8k", "train_sample.jsonl"), data / "gsm8k" / "train.jsonl")

    rows = load_source_rows(SOURCES["gsm8k"], "train", data).shuffle(seed=42)
    assert [SOURCES["gsm8k"].to_conversation(r) for r in rows] == golden["gsm8k_train"]

    for split, kw in (("train", dict(extra_jsonl=[f"{IDENTITY}:2"])), ("val", {})):
        mix = build_sft_mixture(tokenizer, split, data_dir=data, **kw)  # nanochat renders at 2048 tokens
        want = golden[f"{split}_mixture"]
        assert [list(mix.locate(i)) for i in range(len(mix))] == want["index_map"]
        assert [_sha(*mix[i]) for i in range(len(mix))] == want["render_sha256"]
        for i, (ids, mask) in enumerate(want["render_first"]):
            assert mix[i] == (ids, mask)


def test_bad_inputs_fail_clearly(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]\n'
                   '[{"role": "assistant", "content": "out of turn"}]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*alternate"):
        build_sft_mixture(tokenizer, "train", data_dir=SFT / "data", extra_jsonl=[str(bad)])
    with pytest.raises(FileNotFoundError, match="one folder per source"):
        build_sft_mixture(tokenizer, "train", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# 3. the optimizer


def _args(tmp_path, **overrides):
    from modeling_nanochat.sft.trainer import NanoChatSFTConfig

    kw = dict(output_dir=str(tmp_path / "out"), data_dir=str(SFT / "data"), extra_jsonl=[f"{IDENTITY}:2"],
              max_length=-1, per_device_train_batch_size=-1, total_batch_size=-1, use_cpu=True, bf16=False,
              eval_strategy="no", chatcore_every=-1, report_to="none", disable_tqdm=True)
    kw.update(overrides)
    return NanoChatSFTConfig(**kw)


def test_muonadamw_groups_schedule_and_warm_start(pretrain_run, tmp_path):
    from modeling_nanochat.sft.setup import build_trainer

    trainer, record = build_trainer(_args(tmp_path), str(pretrain_run))
    # inherited from the pretraining run, as nanochat's chat_sft does
    assert {k: v["value"] for k, v in record["resolved"].items()} == dict(
        max_length=T, per_device_train_batch_size=B, total_batch_size=2 * B * T, embedding_lr=0.3,
        unembedding_lr=0.008, matrix_lr=0.02)
    assert trainer.args.gradient_accumulation_steps == 2
    assert record["init"]["handover"]["base_lrs"]["matrix"] == 0.02
    opt = unwrap_optimizer(trainer.create_optimizer())
    assert type(opt) is MuonAdamW and opt.distributed is False  # DDP averages; the optimizer must not again
    assert record["optimizer_state"].startswith("loaded")

    s = (64 / 768) ** -0.5  # AdamW LRs scale with the model width
    expected = {"lm_head": (0.008 * s, (0.8, 0.96)), "embedding": (0.3 * s, (0.8, 0.995)),
                "value_embeds": (0.3 * s * 0.5, (0.8, 0.995)), "resid": (0.5 * 0.01, (0.8, 0.95)),
                "x0": (0.5, (0.96, 0.95)), "smear": (0.2, (0.8, 0.95))}
    groups = {g["name"]: g for g in opt.param_groups}
    for name, (lr, betas) in expected.items():
        assert groups[name]["lr"] == pytest.approx(lr * 0.8) == groups[name]["initial_lr"]  # init_lr_frac 0.8
        assert tuple(groups[name]["betas"]) == betas and groups[name]["kind"] == "adamw"
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert muon and all(g["lr"] == pytest.approx(0.02 * 0.8) and g["weight_decay"] == 0.0 for g in muon)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(trainer.model.parameters()))

    # the pretraining momentum buffers were loaded (nanochat --load-optimizer 1), the LRs were not
    saved = torch.load(pretrain_run / "checkpoint-2" / "training_state" / "optimizer.pt", weights_only=False)
    first_muon = sum(len(g["params"]) for g in opt.param_groups[:opt.param_groups.index(muon[0])])
    assert torch.equal(opt.state[muon[0]["params"][0]]["momentum_buffer"][0],
                       saved["state"][first_muon]["momentum_buffer"])
    assert saved["param_groups"][-1]["lr"] != muon[-1]["lr"]

    # schedules: LR constant to 50% of the run then linear to 0; Muon momentum 0.85 -> 0.95 over 300 steps
    sched = trainer.create_scheduler(num_training_steps=1000, optimizer=opt)
    seen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the scheduler without optimizer steps
        for step in range(1000):
            if step in (0, 150, 299, 300, 499, 500, 749, 999):
                seen[step] = (muon[0]["lr"] / muon[0]["initial_lr"], muon[0]["momentum"],
                              groups["lm_head"]["lr"] / groups["lm_head"]["initial_lr"])
            sched.step()
    for step, (lrm, momentum, lrm_adam) in seen.items():
        progress = (step + 1) / 1000
        want = 1.0 if progress <= 0.5 else 1 - (progress - 0.5) / 0.5
        assert lrm == pytest.approx(want, abs=1e-12) and lrm_adam == pytest.approx(want, abs=1e-12)
        assert momentum == pytest.approx(0.85 + 0.10 * min(step / 300, 1))
    assert seen[999][0] == pytest.approx(0.0, abs=1e-12) and seen[499][0] == 1.0


def test_pretraining_state_refused_with_a_reason(pretrain_run, tmp_path, tokenizer):
    from modeling_nanochat.sft.setup import build_trainer

    # another model: shapes differ -> refused, the optimizer stays fresh
    other = perturbed_model(tiny_config(hidden_size=128))
    other_opt = MuonAdamW(build_param_groups(other))
    for p in other.parameters():
        p.grad = torch.ones_like(p)
    other_opt.step()
    trainer, _ = build_trainer(_args(tmp_path, load_optimizer=False), str(pretrain_run))
    opt = unwrap_optimizer(trainer.create_optimizer())
    reason = load_optimizer_state(opt, other_opt.state_dict())
    assert reason is not None and "shape" in reason and not opt.state
    assert "parameter groups" in load_optimizer_state(opt, {"state": {}, "param_groups": []})

    # a DeepSpeed ZeRO run: its optimizer state is DeepSpeed's own -> fresh, and said why
    zero_run = tmp_path / "zero_run"
    shutil.copytree(pretrain_run, zero_run)
    state_dir = zero_run / "checkpoint-2" / "training_state"
    (state_dir / "optimizer.pt").unlink()
    (state_dir / "deepspeed").mkdir()
    record = json.loads((state_dir / "handover.json").read_text())
    record.update(optimizer="muon", distributed_type="DEEPSPEED")
    (state_dir / "handover.json").write_text(json.dumps(record))
    trainer, record = build_trainer(_args(tmp_path), str(zero_run))
    assert not unwrap_optimizer(trainer.create_optimizer()).state  # the warm start happens when it is created
    assert record["optimizer_state"].startswith("fresh") and "DeepSpeed" in record["optimizer_state"]

    # a plain model directory (no training state): nanochat's fallbacks, fresh optimizer
    plain = tmp_path / "plain"
    shutil.copytree(pretrain_run, plain, ignore=shutil.ignore_patterns("checkpoint-*"))
    trainer, record = build_trainer(_args(tmp_path, max_length=T, per_device_train_batch_size=B,
                                          total_batch_size=B * T), str(plain))
    trainer.create_optimizer()
    assert record["optimizer_state"].startswith("fresh") and "no training state" in record["optimizer_state"]
    assert record["resolved"]["matrix_lr"] == {"value": 0.02, "from": "fallback"}
    assert record["resolved"]["unembedding_lr"] == {"value": 0.004, "from": "fallback"}


# ----------------------------------------------------------------------------------------------------------------
# 4. the recipe, end to end


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    env.pop("ACCELERATE_USE_CPU", None)
    env.update(extra)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_recipe_trains_on_tool_conversations_and_saves_a_loadable_model(pretrain_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_nanochat.tokenizer.chat_format import render_conversation

    chat_data = tmp_path / "chat_data"  # local ChatCORE data: the chat-eval samples + shared GSM8K rows
    shutil.copytree(FIXTURES / "nanochat_chat_eval" / "data", chat_data)
    shutil.copy(shared_path("gsm8k", "train_sample.jsonl"), chat_data / "gsm8k.jsonl")
    out = tmp_path / "sft"
    cmd = [sys.executable, "recipes/sft.py", "--config", "recipes/sft/tiny_cpu.yaml",
           "--model_name_or_path", str(pretrain_run), "--output_dir", str(out), "--eval_steps", "6",
           "--chatcore_every", "12", "--chatcore_data", str(chat_data), "--chatcore_max_cat", "3",
           "--chatcore_max_sample", "1", "--chatcore_max_new_tokens", "4", "--save_strategy", "steps",
           "--save_steps", "4"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]

    record = json.loads((out / "run_config.json").read_text())
    assert record["world_size"] == 1 and "identity.jsonl 6 x2" in record["train_mixture"]
    assert record["optimizer_state"].startswith("loaded")
    rows = _metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == record["steps_per_epoch"] * 3 == record["global_step"]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:2]) / 2  # the loss falls
    bpb = [r["eval_bpb"] for r in rows if "eval_bpb" in r]
    assert [r["step"] for r in rows if "eval_bpb" in r] == [0, 6, 12] and bpb[-1] < bpb[0]
    final = [r for r in rows if "eval_chatcore" in r]
    assert [r["step"] for r in final] == [12] and -1 <= final[0]["eval_chatcore"] <= 1
    assert 0 <= final[0]["eval_chatcore/gsm8k"] <= 1

    # an HF model directory the evaluators and the app read
    assert not (out / "chat_template.jinja").exists() and (out / "token_bytes.pt").exists()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    before = AutoModelForCausalLM.from_pretrained(str(pretrain_run))
    assert not torch.equal(model.lm_head.weight, before.lm_head.weight)
    tok = AutoTokenizer.from_pretrained(str(out))
    conv = json.loads(IDENTITY.read_text().splitlines()[1])
    ids, _ = render_conversation(tok, conv)
    assert tok.apply_chat_template(conv["messages"], tokenize=True, return_dict=False) == ids
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([ids])).logits).all()

    # resuming from a mid-run checkpoint (Trainer's resume_from_checkpoint: optimizer, scheduler, skipped rows)
    # ends with the same weights
    from safetensors.torch import load_file

    resumed = tmp_path / "resumed"
    cmd = [sys.executable, "recipes/sft.py", "--config", "recipes/sft/tiny_cpu.yaml", "--model_name_or_path",
           str(pretrain_run), "--output_dir", str(resumed), "--eval_strategy", "no", "--resume_from_checkpoint",
           str(out / "checkpoint-4")]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert [r["step"] for r in _metrics(resumed) if "loss" in r][0] == 5
    full, again = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in full:
        torch.testing.assert_close(again[name], full[name], rtol=0, atol=1e-6, msg=name)


def _two_processes(pretrain_run, out, *extra):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(_free_port())]
    cmd = launch + ["recipes/sft.py", "--config", "recipes/sft/tiny_cpu.yaml", "--model_name_or_path",
                    str(pretrain_run), "--output_dir", str(out), "--num_train_epochs", "1", "--eval_steps", "2",
                    "--save_strategy", "steps", "--save_steps", "2", *extra]
    p = subprocess.run(cmd, cwd=REPO, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    record = json.loads((out / "run_config.json").read_text())
    assert record["world_size"] == 2  # a silent single-process run would say 1
    state = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    for group in state["param_groups"]:  # the whole state was saved (gathered from both ranks when sharded)
        for index in group["params"]:
            key = "exp_avg" if group["kind"] == "adamw" else "momentum_buffer"
            assert state["state"][index][key].abs().sum() > 0
    return record


@pytest.fixture(scope="module")
def ddp_run(pretrain_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_ddp") / "out"
    return out, _two_processes(pretrain_run, out)


@pytest.mark.slow
def test_two_processes_train_and_save(ddp_run, mixture):
    from transformers import AutoModelForCausalLM

    out, record = ddp_run
    assert record["gradient_accumulation_steps"] == 1  # 2048 tokens per step = 4 rows x 256 x 2 processes
    plan = plan_epoch(mixture.lengths, batch_size=B, row_capacity=T + 1, world_size=2)
    assert record["steps_per_epoch"] == plan.micro_batches == record["global_step"]
    assert [r["step"] for r in _metrics(out) if "loss" in r] == list(range(1, plan.micro_batches + 1))
    assert AutoModelForCausalLM.from_pretrained(str(out / "checkpoint-2")) is not None


@pytest.mark.slow
def test_two_processes_sharded_optimizer_is_the_same_math(ddp_run, pretrain_run, tmp_path):
    """nanochat's layout (no DDP all-reduce, MuonAdamW reduce-scatters and keeps sharded state): its collective
    state_dict must not hang Trainer's rank-0 save, and training matches the DDP path."""
    from safetensors.torch import load_file

    out = tmp_path / "sharded"
    _two_processes(pretrain_run, out, "--optimizer_sharding", "true")
    ddp = load_file(ddp_run[0] / "model.safetensors")
    sharded = load_file(out / "model.safetensors")
    assert ddp.keys() == sharded.keys()
    for name in ddp:
        torch.testing.assert_close(sharded[name], ddp[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_default_recipe_offline_without_data_fails_fast_and_clearly(pretrain_run, tmp_path):
    cmd = [sys.executable, "recipes/sft.py", "--config", "recipes/sft/default.yaml", "--model_name_or_path",
           str(pretrain_run), "--output_dir", str(tmp_path / "out")]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "HF_HUB_OFFLINE=1" in p.stderr and "--data_dir DIR" in p.stderr


@pytest.mark.slow
def test_recipe_with_lora_trains_only_adapters_and_merges(pretrain_run, tmp_path):
    """use_peft on the faithful recipe: MuonAdamW gets only the adapters, the output is an adapter dir, and the merged
    export loads like any checkpoint and differs from the base exactly where the adapters sit."""
    from transformers import AutoModelForCausalLM

    from modeling_nanochat.adapters.lora import merge_adapter

    out = tmp_path / "sft-lora"
    cmd = [sys.executable, "recipes/sft.py", "--config", "recipes/sft/tiny_cpu.yaml", "--model_name_or_path",
           str(pretrain_run), "--output_dir", str(out), "--eval_strategy", "no", "--use_peft", "true",
           "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "3"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    record = json.loads((out / "run_config.json").read_text())
    assert record["optimizer_state"] == "fresh: LoRA adapters (use_peft)" and record["lora"]["r"] == 4
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    losses = [r["loss"] for r in _metrics(out) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    merged = tmp_path / "merged"
    merge_adapter(str(out), str(merged), base=str(pretrain_run))
    base = AutoModelForCausalLM.from_pretrained(str(pretrain_run)).state_dict()
    new = AutoModelForCausalLM.from_pretrained(str(merged)).state_dict()
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2") for k in changed)
