"""recipes/speedrun.sh end to end on a reduced tiny preset (d2, a few steps per stage, offline): it finishes with a
report and `python app.py` chats with the result; killed during pretraining and run again, it resumes and ends with
the same losses as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # multi-process or end-to-end: `pytest -m "not slow"` skips it

REDUCED = {  # the tiny preset, shrunk by the script's own environment overrides
    "DEPTH": "2",
    "PRETRAIN_ARGS": "--num-iterations 24 --save-every 8 --eval-every 8 --core-every 12 --core-max-per-task 20",
    "BASE_EVAL_ARGS": "--bpb-tokens 4096 --core-max-per-task 20",
    "SFT_ARGS": "--max_steps 4 --eval_steps 2",
    "RL_ARGS": "--max_steps 2",
    "CHAT_EVAL_ARGS": "--limit 6 --max-new-tokens 24",
    "RUN_COMPRESS": "0",  # the compression lab's own tests run its recipes (tests/compression); CI's speedrun runs it
}


def _env(run_dir, **extra):
    env = dict(os.environ, RUN_DIR=str(run_dir), PYTHON=sys.executable, HF_HUB_OFFLINE="1", **REDUCED)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def _speedrun(run_dir, *args, **popen):
    return subprocess.Popen(["bash", "recipes/speedrun.sh", "--preset", "tiny", *args], cwd=REPO, env=_env(run_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _finish(proc, timeout=900):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _losses(run_dir):
    base = _metrics(run_dir / "base" / "metrics.jsonl")
    sft = _metrics(run_dir / "sft" / "metrics.jsonl")
    rl = _metrics(run_dir / "rl" / "metrics.jsonl")
    return {
        "pretrain": [(r["step"], r["loss"]) for r in base if "loss" in r],
        "val_bpb": [(r["step"], r["val_bpb"]) for r in base if "val_bpb" in r],
        "core": [(r["step"], r["core"]) for r in base if "core" in r],
        "sft": [(r["step"], r.get("loss"), r.get("eval_bpb")) for r in sft if "loss" in r or "eval_bpb" in r],
        "rl": [(r["step"], r.get("loss"), r.get("reward")) for r in rl if "reward" in r],
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("speedrun") / "runs" / "speedrun-tiny"  # where app.py looks by default
    out = _finish(_speedrun(run_dir))
    return run_dir, out


def test_tiny_speedrun_finishes_offline_with_a_report(uninterrupted):
    run_dir, out = uninterrupted
    for stage in ("data", "tokenizer", "pretrain", "base_eval", "base_chat_eval", "sft", "sft_eval", "rl", "rl_eval"):
        info = json.loads((run_dir / "stages" / f"{stage}.json").read_text())
        assert info["seconds"] > 0 and info["attempts"] == 1
    report = (run_dir / "report.md").read_text()
    assert "## Summary" in report and "| ARC-Easy | - | n/a offline | n/a offline |" in report
    assert "synth-chat" in report and "synth-arith" in report and "Does it learn?" in report
    assert (run_dir / "report" / "curves.png").stat().st_size > 10_000
    base_eval = json.loads((run_dir / "eval" / "base.json").read_text())
    assert "synth-core" in base_eval["core"] and base_eval["bpb"]["val"] > 0
    losses = _losses(run_dir)
    assert losses["pretrain"][-1][1] < losses["pretrain"][0][1]  # it learns
    assert [s for s, _ in losses["pretrain"]] == list(range(24))
    assert "speedrun done" in out and "python app.py --model" in out

    # a second run of the same command skips every finished stage and only rebuilds the report
    again = _finish(_speedrun(run_dir), timeout=300)
    assert again.count("finished earlier") == 9 and "== pretrain: python" not in again


def test_killed_during_pretraining_resumes_to_the_same_losses(uninterrupted, tmp_path):
    run_dir = tmp_path / "b"
    proc = _speedrun(run_dir, start_new_session=True)
    metrics = run_dir / "base" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill between the step-8 and step-16 checkpoints
        if metrics.exists() and any(r.get("step", 0) >= 12 and "loss" in r for r in _metrics(metrics)):
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "stages" / "pretrain.json").exists()
    assert (run_dir / "base" / "checkpoint-8").is_dir() and not (run_dir / "base" / "model.safetensors").exists()

    out = _finish(_speedrun(run_dir))
    assert "== data: finished earlier" in out and "== tokenizer: finished earlier" in out
    assert "resum" in out.lower()
    assert json.loads((run_dir / "stages" / "pretrain.json").read_text())["attempts"] == 2
    assert _losses(run_dir) == _losses(uninterrupted[0])
    assert (run_dir / "report.md").exists()


def test_bad_presets_are_refused_with_the_fix(tmp_path):
    bad = subprocess.run(["bash", "recipes/speedrun.sh", "--preset", "d7"], cwd=REPO, env=_env(tmp_path / "x"),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown preset 'd7'" in bad.stderr and "tiny" in bad.stderr
    unknown = subprocess.run(["bash", "recipes/speedrun.sh", "--fast"], cwd=REPO, env=_env(tmp_path / "x"),
                             capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown argument '--fast'" in unknown.stderr
    no_gpu = dict(_env(tmp_path / "x"), CUDA_VISIBLE_DEVICES="")
    gpu = subprocess.run(["bash", "recipes/speedrun.sh", "--preset", "d24"], cwd=REPO, env=no_gpu,
                         capture_output=True, text=True)
    assert gpu.returncode == 2 and "needs a GPU" in gpu.stderr and "--preset tiny" in gpu.stderr
    assert not (tmp_path / "x" / "stages").exists()  # refused before anything was written


def test_app_chats_with_the_speedrun_result(uninterrupted, tmp_path):
    """`python app.py` with no arguments, started where the run's runs/ folder is, serves the RL model: its reply
    over HTTP is that model's greedy reply."""
    from app_helpers import Server, greedy_reply
    from gradio_client import Client
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = uninterrupted
    server = Server([str(REPO / "app.py"), "--port", "{port}"], tmp_path / "app.log", cwd=run_dir.parent.parent)
    try:
        server.wait()
        reply = Client(server.url, verbose=False).predict("What does the cow say?", 0.0, 0, 24, api_name="/chat")
        assert "speedrun-tiny/rl" in server.output()
    finally:
        server.stop()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "rl").eval()
    expected, ids = greedy_reply(model, AutoTokenizer.from_pretrained(run_dir / "rl"), "What does the cow say?", 24)
    assert ids and reply == [{"role": "assistant", "content": expected}]
