"""bench/pretrain_throughput.py: our model's side on a tiny config (nanochat's side needs a user's checkout, so the
test only checks that a wrong --nanochat-dir is refused before any compute)."""

import json
import runpy
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # multi-process or end-to-end: `pytest -m "not slow"` skips it

BENCH = REPO / "bench" / "pretrain_throughput.py"
TINY = ["--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "2", "--vocab-size", "512",
        "--steps", "2", "--warmup", "1", "--device", "cpu", "--compile-optimizer", "off"]


def test_bench_prints_one_json_line_with_throughput(capsys):
    main = runpy.run_path(str(BENCH), run_name="imported_by_test")["main"]
    main(TINY + ["--rounds", "2"])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 1, "stdout must carry only the JSON line"
    result = json.loads(lines[0])
    assert isinstance(result["tok_per_s"], float) and result["tok_per_s"] > 0
    assert result["mfu"] is None and result["peak_mem_gib"] is None  # no peak FLOP/s or CUDA memory on CPU
    assert isinstance(result["flops_per_token"], int) and result["flops_per_token"] > 0
    ours = result["ours"]
    assert len(ours["round_tok_per_s"]) == 2 and ours["tok_per_s"] == result["tok_per_s"]
    assert ours["loss_first"] == pytest.approx(6.24, abs=0.3)  # ~ln(512): random tokens, fresh init
    assert ours["optimizer_compiled"] is False and ours["attn_implementation"] == "sdpa"
    assert "nanochat" not in result and "ratio" not in result
    assert err.count("[ours] round") == 4 and "[ours] warmup step 1/1" in err  # one progress line per step


def test_bench_refuses_a_directory_without_nanochat(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), *TINY, "--nanochat-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stdout == ""
    assert "no nanochat/gpt.py" in r.stderr and "Traceback" not in r.stderr and "[ours]" not in r.stderr
