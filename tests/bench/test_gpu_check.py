"""bench/gpu_check.sh --dry-run (every section on CPU at tiny sizes; nanochat's rows need a user's checkout, so the
test runs without --nanochat-dir and expects them skipped) and modeling_nanochat.utils.attention.pick_attention."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from modeling_nanochat.utils import attention
from modeling_nanochat.utils.attention import FLASH_ATTN3, pick_attention

SCRIPT = REPO / "bench" / "gpu_check.sh"
SECTIONS = ("bf16_vs_fp32", "attention", "pretrain", "fp8", "decode")
GPU_ONLY = {"fp8": "skipped: needs CUDA capability >= 8.9"}  # what the dry run cannot run, and the reason it gives


@pytest.fixture(scope="module")
def dry_run():
    """One dry run shared by the tests below: (parsed JSON line, stderr)."""
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must carry only the JSON line, got {r.stdout[:2000]!r}"
    return json.loads(lines[0]), r.stderr


@pytest.mark.slow
def test_dry_run_reports_every_section(dry_run):
    result, _ = dry_run
    assert result["bench"] == "gpu_check" and result["dry_run"] is True and result["nanochat_dir"] is None
    assert set(result["sections"]) == set(SECTIONS)
    for name, section in result["sections"].items():
        assert section["status"] == GPU_ONLY.get(name, "ok"), (name, section["status"])
        assert section["wall_s"] >= 0 and "ru_maxrss_mib" in section["peak_mem"]  # CPU: RSS, not CUDA memory
    machine = result["machine"]
    assert machine["torch"] == torch.__version__ and machine["transformers"] and machine["device"] == "cpu"
    assert machine["capability"] is None
    assert machine["attention_choice"]["name"] == "sdpa" and machine["attention_choice"]["reason"].startswith("sdpa: ")


@pytest.mark.slow
def test_dry_run_rows(dry_run):
    sections = dry_run[0]["sections"]
    for mode in ("bf16_weights", "autocast_bf16"):  # bf16 is close to fp32 but not equal
        row = sections["bf16_vs_fp32"][mode]
        assert 0 < row["max_abs_diff"] < 1 and 0.5 < row["top1_agreement"] <= 1
    impls = sections["attention"]["implementations"]
    assert impls["sdpa"]["status"] == "ok" and impls["eager"]["max_abs_diff"] < 1e-4  # fp32 on CPU: the same math
    assert impls["flex_attention"]["status"] == "ok" and impls["flex_attention"]["max_abs_diff"] < 1e-4
    assert impls[FLASH_ATTN3]["status"].startswith("skipped: the device is cpu")
    pretrain = sections["pretrain"]
    assert pretrain["settings"]["compile"] is True and pretrain["ours"]["tok_per_s"] > 0
    assert pretrain["ours"]["mfu"] is None  # no peak FLOP/s for a CPU
    assert sections["fp8"]["loss_finite"] is True  # the same step ran unconverted
    assert {"generate", "tool_generation"} <= set(sections["decode"]["ours"]["decode"])  # + whatever paths it adds
    # the dry run decodes at batch 1 and 8 (the GPU run: 1, 8, 32)
    assert [d["batch_size"] for d in sections["decode"]["ours"]["decode"]["generate"]] == [1, 8]
    for name in ("pretrain", "decode"):
        assert sections[name]["nanochat"] == {"status": "skipped: no --nanochat-dir"}


@pytest.mark.slow
def test_dry_run_keeps_progress_on_stderr(dry_run):
    _, err = dry_run
    assert all(f"=== {name}" in err for name in SECTIONS) and "[ours] warmup step 1/1" in err


def test_help_and_bad_sections():
    ok = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "--dry-run" in ok.stdout and "--nanochat-dir" in ok.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--sections", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown ['nope']" in bad.stderr and bad.stdout == ""


def test_pick_attention_cpu():
    name, reason = pick_attention("cpu")
    assert name == "sdpa" and reason.startswith("sdpa: ") and "not CUDA" in reason


@pytest.mark.parametrize("capability, kernels, expected, words", [
    ((9, 0), True, FLASH_ATTN3, "Hopper GPU (capability 9.0)"),
    ((9, 0), False, "sdpa", "pip install kernels"),
    ((8, 0), True, "sdpa", "capability 8.0 is not Hopper"),
    ((10, 0), True, "sdpa", "capability 10.0 is not Hopper"),
])
def test_pick_attention_cuda(monkeypatch, capability, kernels, expected, words):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(attention, "kernels_available", lambda: kernels)
    name, reason = pick_attention(torch.device("cuda"))
    assert name == expected and reason.startswith(f"{expected}: ") and words in reason
    assert "\n" not in reason


def test_kernels_available_follows_find_spec(monkeypatch):
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: None)
    assert attention.kernels_available() is False


def test_flash_attn3_row_that_cannot_load_falls_back_to_sdpa():
    """On CPU (and offline) flash-attn3 cannot run: its row says why, the model stays on sdpa, and the training
    sections then use sdpa rather than compile a model around a kernel already seen failing. In a subprocess, as
    importing gpu_check sets HF_HUB_OFFLINE for the process."""
    code = """if True:
        import json, types, torch
        import bench.gpu_check as g
        ctx = types.SimpleNamespace(device=torch.device("cpu"), sizes=g.DRY_SIZES, seed=0)
        model = g.seeded_model(ctx, torch.float32)
        row = g.attention_row(model, g.FLASH_ATTN3, g.random_ids(ctx, 1, 8), None, ctx.device)
        ctx.attention, ctx.attention_rows = (g.FLASH_ATTN3, "picked"), {g.FLASH_ATTN3: row}
        print(json.dumps({"row": row, "train": g.training_attention(ctx), "impl": model.config._attn_implementation}))
    """
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["row"]["status"].startswith(("skipped: ", "error: ")) and out["impl"] == "sdpa"
    if out["row"]["status"].startswith("skipped: "):  # the usual case: the kernel is not cached, nothing downloads
        assert "get_kernel('kernels-community/flash-attn3')" in out["row"]["status"]
    name, reason = out["train"]
    assert name == "sdpa" and reason.startswith("sdpa: kernels-community/flash-attn3 failed in the attention section")


@pytest.mark.slow
def test_a_broken_nanochat_dir_costs_only_nanochats_rows(tmp_path):
    """nanochat's side failing (here: no checkout at the path) leaves our rows and records why nanochat's are gone."""
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--nanochat-dir", str(tmp_path), "--sections",
                        "pretrain,decode"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sections = json.loads(r.stdout)["sections"]
    for name in ("pretrain", "decode"):
        assert sections[name]["status"] == "ok" and sections[name]["ours"]["status"] == "ok"
        assert sections[name]["nanochat"]["status"].startswith("error: SystemExit: --nanochat-dir")
    assert sections["pretrain"]["failed_attempts"][0]["nanochat"] is True


def test_use_best_attention_falls_back_to_sdpa_and_says_why(monkeypatch):
    """What pretraining runs on a Hopper GPU whose flash-attn3 kernel cannot load (offline, not cached)."""
    from conftest import tiny_config

    from modeling_nanochat import NanoChatForCausalLM
    from modeling_nanochat.utils import attention

    model = NanoChatForCausalLM(tiny_config())
    monkeypatch.setattr(attention, "pick_attention", lambda device: (attention.FLASH_ATTN3, "flash-attn3: Hopper"))
    name, reason = attention.use_best_attention(model, "cuda")
    assert name == "sdpa" and model.config._attn_implementation == "sdpa"
    assert attention.FLASH_ATTN3 in reason and "could not be loaded" in reason
