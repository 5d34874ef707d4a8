"""Distillation (recipes/distill.py = pretraining with --teacher) and --init-from: the loss against a naive
reference, and end to end on CPU: a run that learns from its teacher, step-exact resume, a teacher with another
tokenizer refused, a pruned-size model started from its saved weights and config."""

import json
import shutil
import signal
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F
from test_pretrain import STEPS, _cmd, _metrics, _run, assets  # noqa: F401 - assets is a fixture

from modeling_nanochat import NanoChatForCausalLM
from modeling_nanochat.pretrain.distill import distillation_loss


def _logits(seed, shape=(2, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3


def _reference(s, t, y, temperature, alpha):
    """The textbook formula, position by position, with F.kl_div."""
    valid = y >= 0
    kd = F.kl_div(F.log_softmax(s[valid] / temperature, -1), F.log_softmax(t[valid] / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(s[valid], y[valid])
    return alpha * kd + (1 - alpha) * ce, kd, ce


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.9), (0.5, 1.0)])
def test_loss_and_gradient_equal_the_textbook_formula(temperature, alpha):
    t = _logits(1)
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2))
    y[0, 1] = y[1, 4] = -1  # ignored positions count nowhere
    s1 = _logits(0).requires_grad_()
    s2 = _logits(0).requires_grad_()
    got, parts = distillation_loss(s1, t, y, temperature=temperature, alpha=alpha, ignore_index=-1)
    want, kd, ce = _reference(s2, t, y, temperature, alpha)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(parts["kd"], kd, atol=1e-6) and torch.allclose(parts["ce"], ce, atol=1e-6)
    got.backward()
    want.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_alpha_zero_is_the_hard_loss_and_a_perfect_student_has_no_soft_loss():
    s, y = _logits(0), torch.randint(0, 11, (2, 5))
    loss, parts = distillation_loss(s, _logits(1), y, temperature=2.0, alpha=0.0)
    assert torch.allclose(loss, F.cross_entropy(s.reshape(-1, 11), y.reshape(-1)))
    _, parts = distillation_loss(s, s.clone(), y, temperature=2.0, alpha=0.7)
    assert parts["kd"].abs().item() < 1e-6
    # the model's own loss can be handed in (the trainer does): the same mix
    ce = F.cross_entropy(s.reshape(-1, 11), y.reshape(-1))
    a, _ = distillation_loss(s, _logits(1), y, temperature=2.0, alpha=0.3)
    b, _ = distillation_loss(s, _logits(1), y, temperature=2.0, alpha=0.3, hard_loss=ce)
    assert torch.allclose(a, b, atol=1e-6)


def test_mismatched_vocabularies_are_an_error():
    with pytest.raises(ValueError, match="same vocabulary"):
        distillation_loss(_logits(0), _logits(1, (2, 5, 12)), torch.zeros(2, 5, dtype=torch.long), temperature=1,
                          alpha=0.5)


# -- end to end ----------------------------------------------------------------------------------------------------
STUDENT = ["--depth", "1", "--kd-temperature", "2.0", "--kd-alpha", "0.7"]


@pytest.fixture(scope="module")
def teacher(assets):  # noqa: F811
    out = assets / "teacher"
    _run(assets, out, 1)
    return out


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_distillation_run_learns_from_the_teacher_and_resumes_exactly(assets, teacher):  # noqa: F811
    full = assets / "distilled"
    _run(assets, full, 1, "--teacher", str(teacher), *STUDENT)
    rows = [r for r in _rows(full) if "loss" in r]
    assert len(rows) == STEPS and all("kd_loss" in r and "ce_loss" in r for r in rows)
    for r in rows:  # the logged loss is the mix of the logged terms
        assert r["loss"] == pytest.approx(0.7 * r["kd_loss"] + 0.3 * r["ce_loss"], rel=1e-4)
    assert rows[-1]["kd_loss"] < rows[0]["kd_loss"]  # the student moves towards the teacher
    model = NanoChatForCausalLM.from_pretrained(full)
    assert model.config.num_hidden_layers == 1
    cfg = json.loads((full / "run_config.json").read_text())
    assert cfg["args"]["teacher"] == str(teacher) and cfg["args"]["kd_alpha"] == 0.7

    # killed after a checkpoint, resumed: the same losses and weights as the uninterrupted run
    out = assets / "distilled_killed"
    cmd, env = _cmd(assets, out, 1, "--teacher", str(teacher), *STUDENT, "--save-every", "4")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    deadline = time.time() + 240
    while not (out / "checkpoint-4" / "training_state" / "trainer_state.json").exists():
        assert p.poll() is None, p.stdout.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.05)
    import os
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    _run(assets, out, 1, "--teacher", str(teacher), *STUDENT, "--save-every", "4", "--resume")
    assert _metrics(out) == _metrics(full)
    a, b = model.state_dict(), NanoChatForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resuming with another mix is refused, naming the flag
    cmd, env = _cmd(assets, out, 1, "--teacher", str(teacher), *STUDENT[:4], "--kd-alpha", "0.2", "--resume")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--kd-alpha" in r.stderr


@pytest.mark.slow
def test_a_teacher_with_another_tokenizer_is_refused_before_training(assets, teacher, tmp_path):  # noqa: F811
    other = tmp_path / "other_teacher"
    shutil.copytree(teacher, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|something_else|>"
    (other / "tokenizer.json").write_text(json.dumps(tok))
    cmd, env = _cmd(assets, tmp_path / "s", 1, "--teacher", str(other), *STUDENT)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "tokenizer.json differs" in r.stderr and "--tokenizer" in r.stderr
    assert not (tmp_path / "s" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_init_from_takes_the_weights_and_the_architecture(assets, teacher, tmp_path):  # noqa: F811
    from modeling_nanochat.compression.prune import drop_blocks

    src = tmp_path / "pruned"
    base = NanoChatForCausalLM.from_pretrained(teacher)
    drop_blocks(base, [0]).save_pretrained(src)  # 1 block, width 64: not what --depth 2 of the dial would give
    out = tmp_path / "healed"
    _run(assets, out, 1, "--init-from", str(src), "--num-iterations", "3", "--eval-every", "1")
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["args"]["depth"] == 1 and cfg["plan"]["depth"] == 1
    healed = NanoChatForCausalLM.from_pretrained(out)
    assert healed.config.num_hidden_layers == 1 and healed.config.hidden_size == base.config.hidden_size
    # step 0's val bpb is the pruned model's own (its weights, not a fresh init): the same val tokens scored here
    from evaluation.bpb import bpb_of_split
    from modeling_nanochat.data.sources import resolve_data
    from modeling_nanochat.tokenizer.tokenizer import load_tokenizer, token_bytes_of

    first = next(r["val_bpb"] for r in _rows(out) if "val_bpb" in r and r["step"] == 0)
    tok = load_tokenizer(str(assets / "tok"))
    want = bpb_of_split(NanoChatForCausalLM.from_pretrained(src).eval(), tok, token_bytes_of(str(assets / "tok"), tok),
                        resolve_data(str(assets / "data")), tokens=1024, batch_size=4, seq_len=64)
    assert first == pytest.approx(want, rel=1e-5)
