"""SIGTERM during SFT and GRPO (recipes/sft.py, recipes/grpo.py; optim/trainer_mixin.SaveOnSignal): the real recipe
as a subprocess on CPU with a tiny model gets SIGTERM after its first optimizer step; it must finish the step, save a
complete Trainer checkpoint, say where and how to resume in one line, exit 143 without a traceback, leave no
half-written files and no final model; the same command with --resume_from_checkpoint then continues from that step
to the end (trainer_state.json and metrics.jsonl hold every step exactly once)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import FIXTURES, REPO, perturbed_model, shared_path, tiny_config
from fault_helpers import env, temp_leftovers

pytest.importorskip("trl")

CHECKPOINT_FILES = ("model.safetensors", "config.json", "trainer_state.json", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "tokenizer.json")


def _tokenizer():
    from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer

    return convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))


def _model_dir(path, **config):
    from modeling_nanochat.tokenizer.tokenizer import save_tokenizer

    tok = _tokenizer()
    if config.pop("special_ids", False):
        from modeling_nanochat.tokenizer.tokenizer import special_token_id

        bos, eos = (special_token_id(tok, t) for t in ("<|bos|>", "<|assistant_end|>"))
        config.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=bos)
    perturbed_model(tiny_config(**config)).save_pretrained(path)
    save_tokenizer(tok, str(path))
    return path


def _steps_logged(out) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


def _interrupt(cmd, out, logs, timeout=240) -> tuple[int, str, str]:
    """Start `cmd`, send SIGTERM once metrics.jsonl shows a finished optimizer step, and again as soon as the run
    says it is saving (a launcher forwarding a second signal must not cut the save short). Returns (exit status,
    stdout, stderr)."""
    stdout, stderr = logs / "stdout.txt", logs / "stderr.txt"
    with open(stdout, "w") as fo, open(stderr, "w") as fe:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(TRL_EXPERIMENTAL_SILENCE="1"), stdout=fo, stderr=fe)
        try:
            deadline, sent = time.monotonic() + timeout, 0
            while proc.poll() is None and time.monotonic() < deadline:
                if sent == 0 and _steps_logged(out):
                    proc.send_signal(signal.SIGTERM)
                    sent = 1
                elif sent == 1 and "saving a checkpoint" in stderr.read_text():
                    proc.send_signal(signal.SIGTERM)  # best effort: lands during the save or just after it
                    sent = 2
                time.sleep(0.02)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sent, f"the run ended before it logged a step\n{stdout.read_text()[-2000:]}\n{stderr.read_text()[-4000:]}"
    return proc.returncode, stdout.read_text(), stderr.read_text()


def _check_interrupted(rc, stdout, stderr, out, max_steps, told) -> int:
    """The interrupted run's exit status, message and checkpoint; returns the saved step."""
    shown = f"exit {rc}\n--- stdout\n{stdout[-2000:]}\n--- stderr\n{stderr[-5000:]}"
    assert rc == 128 + signal.SIGTERM == 143, shown
    assert "Traceback" not in stdout + stderr, shown
    line = r"^interrupted by SIGTERM at step (\d+): saved (\S+); resume with --resume_from_checkpoint (\S+)$"
    match = re.search(line, stderr, re.M)
    assert match, shown
    told(match.group(0))
    step, ckpt = int(match.group(1)), out / f"checkpoint-{match.group(1)}"
    assert match.group(2) == match.group(3) == str(ckpt), shown
    assert 1 <= step < max_steps, shown
    assert [p.name for p in out.glob("checkpoint-*")] == [ckpt.name]  # the only checkpoint: the signal's
    missing = [f for f in CHECKPOINT_FILES if not (ckpt / f).is_file()]
    assert not missing, f"checkpoint incomplete, missing {missing}\n{shown}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == step and state["max_steps"] == max_steps
    assert not temp_leftovers(out)
    assert not (out / "model.safetensors").exists()  # an unfinished run does not publish a final model
    return step


def _check_resumed(res, out, step, max_steps):
    shown = f"exit {res.returncode}\n--- stdout\n{res.stdout[-2000:]}\n--- stderr\n{res.stderr[-5000:]}"
    assert res.returncode == 0, shown
    state = json.loads((out / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == max_steps > step
    logged = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged == list(range(1, max_steps + 1)), logged  # the interrupted run's steps, then the resumed ones
    assert _steps_logged(out) == list(range(1, max_steps + 1))
    assert (out / "model.safetensors").is_file() and not temp_leftovers(out)
    return state


@pytest.mark.slow
@pytest.mark.fault("Interrupted", "SIGTERM during SFT: checkpoint, exit 143, resume")
def test_sigterm_during_sft_saves_a_checkpoint_that_resumes(tmp_path, told):
    model, out = _model_dir(tmp_path / "model", special_ids=True), tmp_path / "sft"
    epochs = 10  # 4 steps per epoch: enough steps left after the first for the signal to land mid-run
    cmd = [sys.executable, "recipes/sft.py", "--config", "recipes/sft/tiny_cpu.yaml", "--model_name_or_path",
           str(model), "--output_dir", str(out), "--eval_strategy", "no", "--num_train_epochs", str(epochs),
           "--save_strategy", "steps", "--save_steps", "1000"]
    rc, stdout, stderr = _interrupt(cmd, out, tmp_path)
    max_steps = 4 * epochs
    step = _check_interrupted(rc, stdout, stderr, out, max_steps, told)

    res = subprocess.run(cmd + ["--resume_from_checkpoint", str(out / f"checkpoint-{step}")], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=300)
    _check_resumed(res, out, step, max_steps)
    record = json.loads((out / "run_config.json").read_text())
    assert record["global_step"] == max_steps


@pytest.mark.slow
@pytest.mark.fault("Interrupted", "SIGTERM during GRPO: checkpoint, exit 143, resume")
def test_sigterm_during_grpo_saves_a_checkpoint_that_resumes(tmp_path, told):
    data = shared_path("gsm8k", "train_sample.jsonl")
    model, out = _model_dir(tmp_path / "model"), tmp_path / "rl"
    max_steps = 4
    cmd = [sys.executable, "recipes/grpo.py", "--config", "recipes/grpo/tiny_cpu.yaml", "--model_name_or_path",
           str(model), "--output_dir", str(out), "--data", str(data), "--max_steps", str(max_steps),
           "--save_strategy", "steps", "--save_steps", str(max_steps)]
    rc, stdout, stderr = _interrupt(cmd, out, tmp_path)
    step = _check_interrupted(rc, stdout, stderr, out, max_steps, told)

    res = subprocess.run(cmd + ["--resume_from_checkpoint", str(out / f"checkpoint-{step}")], cwd=REPO,
                         env=env(TRL_EXPERIMENTAL_SILENCE="1"), capture_output=True, text=True, timeout=300)
    state = _check_resumed(res, out, step, max_steps)
    rewards = [h["step"] for h in state["log_history"] if "rewards/gsm8k_reward/mean" in h]
    assert rewards == list(range(1, max_steps + 1))


@pytest.mark.slow
@pytest.mark.fault("Interrupted", "SFT killed while saving checkpoint-N (optimizer.pt never written), then resume")
def test_resume_from_a_partial_sft_checkpoint_names_the_earlier_one(tmp_path, told):
    """The Trainer writes checkpoints in place: a SIGKILL mid-save leaves checkpoint-N without its optimizer state,
    from which the Trainer itself would resume with a fresh optimizer and say nothing."""
    model, out = _model_dir(tmp_path / "model", special_ids=True), tmp_path / "sft"
    cmd = [sys.executable, "recipes/sft.py", "--config", "recipes/sft/tiny_cpu.yaml", "--model_name_or_path",
           str(model), "--output_dir", str(out), "--eval_strategy", "no", "--max_steps", "2",
           "--save_strategy", "steps", "--save_steps", "1"]
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first, last = out / "checkpoint-1", out / "checkpoint-2"
    assert all((c / f).is_file() for c in (first, last) for f in CHECKPOINT_FILES)
    (last / "optimizer.pt").unlink()  # what a kill between the weights and the optimizer state leaves
    res = subprocess.run(cmd + ["--resume_from_checkpoint", str(last), "--max_steps", "3"], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=300)
    shown = f"exit {res.returncode}\n--- stdout\n{res.stdout[-2000:]}\n--- stderr\n{res.stderr[-4000:]}"
    assert res.returncode == 2 and "Traceback" not in res.stdout + res.stderr, shown
    line = next((ln for ln in res.stderr.splitlines() if ln.startswith("error: ")), "")
    told(line)
    assert line == f"error: {last} is incomplete: optimizer.pt missing (was the run stopped while saving it?); " \
                   "resuming from it would continue with a fresh optimizer", shown
    assert f"fix: resume from {first} (the checkpoint before it)" in res.stderr, shown
    assert not (out / "checkpoint-3").exists()  # nothing trained on a half state
