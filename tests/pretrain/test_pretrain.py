"""recipes/pretrain.py end to end on CPU: real `accelerate launch` with 2 gloo processes, equality with a 1-process
run fed the same global batches, step-exact resume after SIGKILL (1 process) and SIGTERM (2 processes), and the
errors a user gets before any compute."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import FIXTURES, REPO
from test_pretrain_data import write_tiny_shards

from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM
from modeling_nanochat.optim.muon_adamw import MuonAdamW, build_param_groups
from modeling_nanochat.data.loader import PretrainLoader, resolve_data
from modeling_nanochat.optim.scaling import plan_training
from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer, save_tokenizer

STEPS = 14
# a 2-layer, 64-wide model on T=64 rows; LRs are raised because the dial scales them by sqrt(512 / 2^19) ~ 0.03
FLAGS = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
         "--device-batch-size", "4", "--total-batch-size", "512", "--num-iterations", str(STEPS),
         "--embedding-lr", "3", "--unembedding-lr", "0.1", "--matrix-lr", "0.6", "--scalar-lr", "2",
         "--warmup-steps", "2", "--eval-every", "5", "--eval-tokens", "1024", "--core-every", "-1",
         "--sample-every", "-1"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    write_tiny_shards(root / "data")
    save_tokenizer(convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer")), str(root / "tok"))
    return root


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(assets, out, nproc, *extra):
    args = [str(REPO / "recipes" / "pretrain.py"), *FLAGS, "--tokenizer", str(assets / "tok"),
            "--data", str(assets / "data"), "--output-dir", str(out), *extra]
    if nproc == 1:
        return [sys.executable, *args], _env()
    # the README's CPU command: --cpu alone would start ONE process without a word
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
              "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(_free_port())]
    return launch + args, dict(_env(), ACCELERATE_USE_CPU="1")


def _run(assets, out, nproc, *extra, timeout=300):
    cmd, env = _cmd(assets, out, nproc, *extra)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def _start_and_interrupt(assets, out, nproc, sig, after_checkpoint):
    """Start a run, wait until checkpoint-<after_checkpoint> exists, then send `sig` to the whole process group."""
    cmd, env = _cmd(assets, out, nproc, "--save-every", str(after_checkpoint))
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    deadline = time.time() + 240
    while not (out / f"checkpoint-{after_checkpoint}" / "training_state" / "trainer_state.json").exists():
        assert p.poll() is None, p.stdout.read()[-4000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(p.pid, sig)
    log = p.communicate(timeout=120)[0]
    return p.returncode, log


def _metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    return train, val


@pytest.fixture(scope="module")
def two_process_run(assets):
    out = assets / "run2"
    _run(assets, out, 2)
    return out


@pytest.mark.slow
def test_two_processes_really_run_and_learn(two_process_run):
    cfg = json.loads((two_process_run / "run_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["distributed_type"] == "MULTI_CPU"
    assert cfg["plan"]["grad_accum_steps"] == 1  # 512 tokens = 4 rows x 64 x 2 processes
    train, val = _metrics(two_process_run)
    assert [s for s, _ in train] == list(range(STEPS))
    losses = [loss for _, loss in train]
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    assert [s for s, _ in val] == [0, 5, 10, STEPS] and val[-1][1] < val[0][1]
    # the final model and every checkpoint load as plain HF models
    model = NanoChatForCausalLM.from_pretrained(two_process_run)
    assert model.config.num_hidden_layers == 2
    assert (two_process_run / f"checkpoint-{STEPS}" / "training_state" / "optimizer.pt").exists()
    summary = (two_process_run / "summary.md").read_text()
    assert f"| steps done | {STEPS} |" in summary and (two_process_run / "loss.png").stat().st_size > 10_000


@pytest.mark.slow
def test_two_processes_equal_one_process_fed_the_same_global_batches(assets, two_process_run):
    """The 2-process losses equal a plain single-process loop over both ranks' micro-batches (grad accumulation 2)."""
    tok = convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))
    bos = tok.convert_tokens_to_ids("<|bos|>")
    config = NanoChatConfig(depth=2, aspect_ratio=32, head_dim=32, max_position_embeddings=64, vocab_size=len(tok),
                            bos_token_id=bos, eos_token_id=tok.convert_tokens_to_ids("<|assistant_end|>"),
                            pad_token_id=bos)
    plan = plan_training(config, world_size=2, device_batch_size=4, total_batch_size=512, num_iterations=STEPS,
                         embedding_lr=3, unembedding_lr=0.1, matrix_lr=0.6, scalar_lr=2, warmup_steps=2)
    torch.manual_seed(42)
    model = NanoChatForCausalLM(config)
    opt = MuonAdamW(build_param_groups(model, unembedding_lr=plan.unembedding_lr, embedding_lr=plan.embedding_lr,
                                       matrix_lr=plan.matrix_lr, scalar_lr=plan.scalar_lr,
                                       weight_decay=plan.weight_decay))
    source = resolve_data(str(assets / "data"))
    loaders = [PretrainLoader(source, tok, batch_size=4, seq_len=64, rank=r, world_size=2) for r in (0, 1)]
    ours = []
    for it in range(STEPS):
        total = 0.0
        for loader in loaders:
            x, y = next(loader)
            loss = model(input_ids=x, labels=y, shift_labels=y).loss
            (loss / 2).backward()
            total += loss.item() / 2
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * plan.lr_multiplier(it)
            if g["kind"] == "muon":
                g["momentum"], g["weight_decay"] = plan.muon_momentum(it), plan.muon_weight_decay(it)
        opt.step()
        model.zero_grad(set_to_none=True)
        ours.append(total)
    theirs = [loss for _, loss in _metrics(two_process_run)[0]]
    assert theirs == pytest.approx(ours, rel=0, abs=1e-5)  # measured: 7e-7 (summation order of the grad mean)


@pytest.mark.slow
def test_sigterm_on_two_processes_saves_and_resume_is_step_exact(assets, two_process_run):
    out = assets / "run2_interrupted"
    rc, log = _start_and_interrupt(assets, out, 2, signal.SIGTERM, after_checkpoint=3)
    assert rc != 0, log[-3000:]
    saved = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")]
    assert 3 < max(saved) < STEPS, saved  # the signal's own checkpoint, at the next step boundary
    _run(assets, out, 2, "--resume", "--save-every", "3")
    assert _metrics(out) == _metrics(two_process_run)
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["resumed_from"].endswith(f"checkpoint-{max(saved)}")


@pytest.mark.slow
def test_sigkill_on_one_process_then_resume_is_step_exact(assets):
    full = assets / "run1"
    _run(assets, full, 1)
    out = assets / "run1_killed"
    _start_and_interrupt(assets, out, 1, signal.SIGKILL, after_checkpoint=4)
    assert not (out / f"checkpoint-{STEPS}").exists()
    p = _run(assets, out, 1, "--resume", "--save-every", "4")
    assert "resuming from" in p.stdout
    assert _metrics(out) == _metrics(full)
    a = NanoChatForCausalLM.from_pretrained(full).state_dict()
    b = NanoChatForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _fails(assets, out, *extra):
    cmd, env = _cmd(assets, out, 1, *extra)
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    return p.stderr, time.time() - t0


@pytest.mark.slow
def test_impossible_batch_is_refused_before_compute(assets, tmp_path):
    err, _ = _fails(assets, tmp_path / "x", "--total-batch-size", "1000")
    assert "not a multiple of" in err and "--total-batch-size" in err
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_existing_run_is_not_overwritten_without_a_flag(assets, two_process_run):
    before = (two_process_run / "metrics.jsonl").read_text()
    err, _ = _fails(assets, two_process_run)
    assert "--resume" in err and "--overwrite" in err
    assert (two_process_run / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_missing_tokenizer_and_bad_data_are_clear(assets, tmp_path):
    cmd, env = _cmd(assets, tmp_path / "y", 1)
    cmd[cmd.index("--tokenizer") + 1] = str(tmp_path)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no tokenizer.json" in p.stderr
    cmd, env = _cmd(assets, tmp_path / "z", 1)
    cmd[cmd.index("--data") + 1] = str(tmp_path / "nothing-here")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "nothing-here" in p.stderr


@pytest.mark.slow
def test_print_plan(assets):
    cmd = [sys.executable, str(REPO / "recipes" / "pretrain.py"), "--depth", "12", "--print-plan",
           "--tokenizer", str(assets / "tok")]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["vocab_size"] == 512 and plan["depth"] == 12 and plan["grad_accum_steps"] == 8


@pytest.mark.slow
def test_tensorboard_tracker_gets_the_metrics(assets, tmp_path):
    out = tmp_path / "tb"
    _run(assets, out, 1, "--num-iterations", "3", "--report-to", "tensorboard", "--run-name", "tiny")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2]
    assert [e.step for e in acc.Scalars("val/bpb")] == [0, 3]


@pytest.mark.slow
def test_core_during_training(assets, tmp_path):
    from conftest import shared_path
    bundle = shared_path("core_sample")
    out = tmp_path / "core"
    _run(assets, out, 1, "--num-iterations", "4", "--core-every", "2", "--core-bundle", str(bundle),
         "--core-max-per-task", "16")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    core = [r for r in rows if "core" in r]
    assert [r["step"] for r in core] == [2, 4]
    assert all(-1 <= r["core"] <= 1 and len(r["core_results"]) == 6 for r in core)
    assert "| CORE (last) |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_corrupt_core_bundle_fails_before_training(assets, tmp_path):
    err, _ = _fails(assets, tmp_path / "x", "--core-every", "2", "--core-bundle", str(tmp_path))
    assert "CORE" in err and "--core-bundle" in err


@pytest.mark.slow
def test_compiled_training_runs_and_matches_eager(assets, tmp_path):
    """--compile trains through the torch.compile'd module (it once failed at start: a compiled module has no truth
    value); inductor rounds differently from eager, so the losses agree closely, not bitwise."""
    flags = ("--num-iterations", "2", "--compile-optimizer", "off", "--eval-every", "-1")
    _run(assets, tmp_path / "eager", 1, *flags)
    _run(assets, tmp_path / "compiled", 1, *flags, "--compile", timeout=600)
    (eager, _), (compiled, _) = (_metrics(tmp_path / name) for name in ("eager", "compiled"))
    assert [step for step, _ in compiled] == [step for step, _ in eager] and len(eager) == 2
    for (_, a), (_, b) in zip(eager, compiled):
        assert b == pytest.approx(a, rel=1e-3)
