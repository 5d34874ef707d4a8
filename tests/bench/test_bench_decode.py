"""bench/decode_throughput.py runs end to end on a tiny model and prints one JSON line with every path's prefill and
per-batch decode figures (nanochat's side needs a nanochat checkout and is left out here)."""

import pytest
import json
import os
import subprocess
import sys

from conftest import REPO

pytestmark = pytest.mark.slow  # multi-process or end-to-end: `pytest -m "not slow"` skips it

BATCHES = [1, 3]
NEW_TOKENS = 6
PATHS = ["generate", "tool_generation", "tool_generation_compiled", "generate_static_compiled"]


def test_decode_bench_prints_prefill_and_decode_per_batch_size():
    cmd = [sys.executable, str(REPO / "bench" / "decode_throughput.py"), "--depth", "2", "--aspect-ratio", "32",
           "--head-dim", "32", "--vocab-size", "512", "--seq-len", "128", "--prompt-len", "12",
           "--new-tokens", str(NEW_TOKENS), "--batch-sizes", ",".join(map(str, BATCHES)), "--repeats", "2",
           "--threads", "1", "--paths", ",".join(PATHS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # the table goes to stderr; stdout is the JSON alone
    out = json.loads(lines[0])
    paths = set(PATHS)
    assert set(out["compile_s"]) == {p for p in PATHS if "compiled" in p}
    assert set(out["prefill"]) == set(out["decode"]) == paths and "ratio_vs_nanochat" not in out
    assert out["model"]["depth"] == 2 and out["model"]["params"] > 0 and out["prompt_len"] == 12
    for p in paths:
        assert out["prefill"][p]["tok_per_s"] > 0 and out["prefill"][p]["time_s"] > 0
        rows = out["decode"][p]
        assert [r["batch_size"] for r in rows] == BATCHES
        for r in rows:
            assert r["decode_steps"] == NEW_TOKENS - 1  # every row ran to the end: no early stop
            assert r["decode_tok_per_s_best"] >= r["decode_tok_per_s"] > 0 and r["ttft_s"] > 0 and r["tpot_s"] > 0
