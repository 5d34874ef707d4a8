"""recipes/pretrain.py under DeepSpeed ZeRO-2 and ZeRO-3 on CPU: 2 real processes (gloo), DeepSpeed's Muon with
nanochat's groups, gradient accumulation 2, checkpoints that from_pretrained loads, and ZeRO-2 resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from test_pretrain import FLAGS, _free_port, _metrics, assets  # noqa: F401 - module-scoped data + tokenizer

from modeling_nanochat import NanoChatForCausalLM

pytestmark = pytest.mark.slow  # multi-process or end-to-end: `pytest -m "not slow"` skips it

STEPS = 4
ZFLAGS = [f for f in FLAGS]
for flag, value in (("--num-iterations", str(STEPS)), ("--device-batch-size", "2"), ("--eval-every", "2")):
    ZFLAGS[ZFLAGS.index(flag) + 1] = value  # 512 tokens = 2 rows x 64 x 2 processes x 2 accumulation steps


def _cmd(assets, out, stage, *extra):
    env = dict(os.environ, DS_ACCELERATOR="cpu", TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO),
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "accelerate_configs" / f"cpu_zero{stage}.yaml"), "--main_process_port", str(_free_port()),
           str(REPO / "recipes" / "pretrain.py"), *ZFLAGS, "--tokenizer", str(assets / "tok"),
           "--data", str(assets / "data"), "--output-dir", str(out), *extra]
    return cmd, env


def _run(assets, out, stage, *extra):
    cmd, env = _cmd(assets, out, stage, *extra)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_and_saves_a_loadable_checkpoint(assets, tmp_path, stage):
    out = tmp_path / f"z{stage}"
    _run(assets, out, stage, "--save-every", "2")
    cfg = json.loads((out / "run_config.json").read_text())
    assert (cfg["world_size"], cfg["distributed_type"], cfg["optimizer"]) == (2, "DEEPSPEED", "muon")
    assert cfg["plan"]["grad_accum_steps"] == 2
    train, val = _metrics(out)
    assert [s for s, _ in train] == list(range(STEPS))
    assert train[-1][1] < train[0][1] - 0.3, train
    assert [s for s, _ in val] == [0, 2, 4]
    model = NanoChatForCausalLM.from_pretrained(out)  # the final model, gathered from ZeRO-3 shards too
    ckpt = NanoChatForCausalLM.from_pretrained(out / f"checkpoint-{STEPS}")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ckpt.state_dict().values()))
    early = NanoChatForCausalLM.from_pretrained(out / "checkpoint-2")
    assert not torch.equal(early.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert (out / "checkpoint-2" / "training_state" / "deepspeed").is_dir()
    assert not list(out.glob(".tmp-*"))


def test_zero2_resume_after_kill_is_step_exact(assets, tmp_path):
    full = tmp_path / "full"
    _run(assets, full, 2)
    out = tmp_path / "killed"
    cmd, env = _cmd(assets, out, 2, "--save-every", "2")
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 600
    while not (out / "checkpoint-2" / "training_state" / "trainer_state.json").exists():
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / f"checkpoint-{STEPS}").exists()
    _run(assets, out, 2, "--resume", "--save-every", "2")
    assert _metrics(out) == _metrics(full)
