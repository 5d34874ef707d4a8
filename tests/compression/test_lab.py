"""recipes/compress.py end to end on a tiny model and the synthetic world's data: one command writes
compression.md/.png/.json, every requested method is either measured or an n/a row with its reason, and the numbers
in the report are the run's own (medians of the recorded rounds)."""

import json
import statistics
import subprocess
import sys

import pytest
from app_helpers import save_checkpoint, tiny_checkpoint
from conftest import REPO, perturbed_model, tiny_config

pytestmark = pytest.mark.slow  # an end-to-end recipe run (~1 min)

METHODS = "torchao-int8-wo,torchao-int4-wo,quanto-int8,quanto-int4,bnb-nf4"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    subprocess.run([sys.executable, "-m", "modeling_nanochat.data.synthetic", "--output-dir", str(root / "data")],
                   check=True, capture_output=True, cwd=REPO)
    model, tok, path = tiny_checkpoint(root / "model")
    other = save_checkpoint(perturbed_model(tiny_config(depth=2), seed=7), tok, root / "other")
    sys.path.insert(0, str(REPO))
    from recipes.compress import main

    report = main(["--model", path, "--output-dir", str(root / "out"), "--methods", METHODS,
                   "--val-data", str(root / "data" / "pretrain"), "--val-tokens", "2048",
                   "--core", str(root / "data" / "core"), "--core-max-per-task", "4",
                   "--chat-data", str(root / "data" / "chat_eval"), "--chat-limit", "4", "--repeats", "2",
                   "--variant", f"smaller={other}:pruned", "--base-variant", f"base={other}:fp32"])
    return root / "out", report


def test_one_command_writes_the_report_files(lab):
    out, report = lab
    md = (out / "compression.md").read_text()
    assert md == report["markdown"] and (out / "compression.png").stat().st_size > 10_000
    saved = json.loads((out / "compression.json").read_text())
    assert [r["name"] for r in saved["rows"]] == [r["name"] for r in report["rows"]]
    assert "## Chat models" in md and "## Base models" in md and "Machine: " in md


def test_every_method_is_measured_or_marked_na_with_a_reason(lab):
    out, report = lab
    rows = {r["name"]: r for r in report["rows"]}
    md = report["markdown"]
    for m in METHODS.split(","):
        assert m in rows, m
        if rows[m].get("unavailable"):
            assert f"- **{m}**: " in md and "\n" not in rows[m]["unavailable"]
            line = next(x for x in md.splitlines() if x.startswith(f"| {m} |"))
            assert line.count("n/a") >= 10
        else:
            assert rows[m]["val_bpb"] > 0 and rows[m]["decode_tok_s_b1"] > 0
    assert not rows["torchao-int8-wo"].get("unavailable")  # the locked stack runs it on CPU
    assert rows["torchao-int8-wo"]["quantized_bytes_ratio"] >= 3
    assert "torchao-int8-wo (keep none)" in rows  # the measurement behind the default of what stays in float


def test_numbers_come_from_the_run(lab):
    out, report = lab
    for r in report["rows"]:
        if r.get("unavailable"):
            continue
        assert len(r["speed_rounds"]) == 2
        for key in ("prefill_tok_s_b1", "decode_tok_s_b8"):
            assert r[key] == statistics.median(x[key] for x in r["speed_rounds"])
        assert r["peak_memory_bytes"] > 0 and r["params"] > 0
        if r["group"] == "chat":
            assert 0 <= r["synth_chat"] <= 1 and 0 <= r["synth_arith"] <= 1
        else:
            assert "synth_chat" not in r and r["core"] is not None
    fp32 = next(r for r in report["rows"] if r["name"] == "fp32")
    line = next(x for x in report["markdown"].splitlines() if x.startswith("| fp32 (ref) |"))
    assert f"{fp32['val_bpb']:.4f}" in line and f"{fp32['disk_bytes'] / 1e6:.2f}" in line
    # divergence from the reference: zero for the reference itself, positive for a quantized copy of it
    assert fp32["kl_to_ref"] == 0.0 and fp32["top1_agree"] == 1.0
    int8 = next(r for r in report["rows"] if r["name"] == "torchao-int8-wo")
    assert int8["kl_to_ref"] > 0 and int8["top1_agree"] > 0.8
