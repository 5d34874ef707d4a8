"""recipes/distill_on_policy.py: TRL's on-policy DistillationTrainer on our chat checkpoints, end to end on CPU
(the student changes and saves as a checkpoint of ours), and a teacher with another vocabulary refused."""

import subprocess
import sys

import pytest
import torch
from app_helpers import save_checkpoint, tiny_checkpoint
from conftest import REPO, perturbed_model, shared_path, tiny_config

pytestmark = pytest.mark.slow


def _run(args, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "recipes" / "distill_on_policy.py"),
                           "--config", str(REPO / "recipes" / "distill" / "on_policy_tiny.yaml"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_student_learns_on_its_own_samples_and_saves(tmp_path):
    from modeling_nanochat import NanoChatForCausalLM

    data = shared_path("gsm8k", "train_sample.jsonl")
    _, tok, teacher = tiny_checkpoint(tmp_path / "teacher")
    student = save_checkpoint(perturbed_model(tiny_config(depth=2), seed=3), tok, tmp_path / "student")
    out = tmp_path / "out"
    p = _run(["--model_name_or_path", student, "--teacher_model_name_or_path", teacher, "--data", str(data),
              "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
              "--max_completion_length", "8", "--max_prompts", "8"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    before = NanoChatForCausalLM.from_pretrained(student).state_dict()
    after = NanoChatForCausalLM.from_pretrained(out).state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "tokenizer.json").is_file()


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    data = shared_path("gsm8k", "train_sample.jsonl")
    _, tok, student = tiny_checkpoint(tmp_path / "student")
    other = save_checkpoint(perturbed_model(tiny_config(vocab_size=640)), tok, tmp_path / "teacher")
    p = _run(["--model_name_or_path", student, "--teacher_model_name_or_path", other, "--data", str(data),
              "--output_dir", str(tmp_path / "out"), "--max_steps", "1"], timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert "vocab_size" in p.stderr and "different tokenizers" in p.stderr
