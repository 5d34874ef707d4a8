"""Impossible flags, refused before any compute with the flag named: model shapes the depth dial cannot build, batch
sizes that do not divide, a --resume that would change the architecture, nanochat's optimizer inside ZeRO, a GPU
preset on a machine without one, and the recipe docstring's own --print-plan example (which needs no tokenizer)."""

import json
import subprocess
import sys

import pytest
from conftest import REPO
from fault_helpers import digest, env, pretrain_args, pretrain_assets, run, user_error

PLAN = [REPO / "recipes" / "pretrain.py", "--print-plan"]


@pytest.mark.fault("Flags", "the docstring's `pretrain.py --depth 4 --print-plan` (no tokenizer)")
def test_print_plan_needs_no_tokenizer(told):
    res = run(*PLAN, "--depth", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    plan = json.loads(res.stdout)
    assert plan["depth"] == 4 and plan["vocab_size"] == 32768  # nanochat's tokenizer size (--vocab-size)
    told(f"plan printed: {plan['num_iterations']} iterations, batch {plan['total_batch_size']:,} tokens")


@pytest.mark.parametrize("flags, fragments", [
    (["--window-pattern", "SXL"], ["--window-pattern", "'S'", "'L'"]),
    (["--head-dim", "7"], ["--head-dim", "even"]),
    (["--aspect-ratio", "0"], ["--aspect-ratio", "positive"]),
    (["--max-seq-len", "0"], ["--max-seq-len", "positive"]),
    (["--depth", "0"], ["depth", "positive"]),
], ids=["window-pattern", "odd-head-dim", "zero-aspect-ratio", "zero-seq-len", "zero-depth"])
@pytest.mark.fault("Flags", "impossible depth/width/head/window/sequence flags")
def test_impossible_model_flags(flags, fragments, told):
    told(user_error(run(*PLAN, *flags), *fragments))


@pytest.mark.fault("Flags", "a total batch that device batch x seq len does not divide")
def test_batch_that_does_not_divide(told):
    res = run(*PLAN, "--depth", "4", "--total-batch-size", "1000", "--device-batch-size", "3")
    told(user_error(res, "not a multiple of", "3 x 2048", "--total-batch-size as a multiple of 2048"))


@pytest.mark.slow
@pytest.mark.fault("Flags", "--resume with a changed --window-pattern")
def test_resume_with_changed_architecture(tmp_path, told):
    assets = pretrain_assets(tmp_path)
    out = tmp_path / "run"
    first = run(*pretrain_args(assets, out, "--num-iterations", 2, "--save-every", 2, "--window-pattern", "L"))
    assert first.returncode == 0, first.stderr[-3000:]
    before = digest(out)
    res = run(*pretrain_args(assets, out, "--num-iterations", 4, "--window-pattern", "SL", "--resume"))
    told(user_error(res, "--window-pattern", "'SL'", "'L'", "resume with --window-pattern L"))
    assert digest(out) == before


@pytest.mark.slow
@pytest.mark.fault("Flags", "--optimizer muonadamw under a DeepSpeed ZeRO config")
def test_muonadamw_under_zero(tmp_path, told):
    assets = pretrain_assets(tmp_path)
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "accelerate_configs" / "cpu_zero2.yaml"),
           "--num_processes", "1", "--main_process_port", "29583",
           *pretrain_args(assets, tmp_path / "run", "--num-iterations", 2, "--optimizer", "muonadamw")]
    res = subprocess.run(cmd, cwd=REPO, env=env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300)
    assert "--optimizer muonadamw cannot run under DeepSpeed ZeRO" in res.stderr, res.stderr[-3000:]
    assert "use --optimizer muon" in res.stderr and "Traceback" not in res.stderr.split("error:")[0]
    assert res.returncode != 0 and not (tmp_path / "run" / "metrics.jsonl").exists()
    told(res.stderr[res.stderr.index("error:"):])


@pytest.mark.fault("Flags", "a GPU speedrun preset on a machine without a GPU")
def test_gpu_preset_without_gpu(told):
    res = subprocess.run(["bash", str(REPO / "recipes" / "speedrun.sh"), "--preset", "d12"], cwd=REPO,
                         env=env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    told(user_error(res, "--preset d12 needs a GPU", "--preset tiny"))
