"""The scaling-laws and miniseries sweeps: real pretrain.py runs, rows read from each run's files, restart skips."""

import pytest
import csv
import subprocess
import sys

from conftest import REPO
from test_pretrain import FLAGS, _env, assets  # noqa: F401 - the module-scoped data + tokenizer fixture

pytestmark = pytest.mark.slow  # multi-process or end-to-end: `pytest -m "not slow"` skips it

# the tiny model settings of test_pretrain minus the horizon and depth, which the sweeps set
TINY = [f for f in FLAGS]
for flag in ("--num-iterations", "--depth"):
    i = TINY.index(flag)
    del TINY[i:i + 2]


def _sweep(script, assets, results, *flags, passthrough=()):
    cmd = [sys.executable, str(REPO / "recipes" / script), "--results-dir", str(results), *flags, "--",
           *TINY, "--tokenizer", str(assets / "tok"), "--data", str(assets / "data"), "--core-every", "-1",
           *passthrough]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_scaling_laws_sweep(assets, tmp_path):
    p = _sweep("scaling_laws.py", assets, tmp_path, "--flops", "3e9", "--depths", "1,2")
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["label"] for r in rows] == ["flops3e9_d1", "flops3e9_d2"]
    for r in rows:  # each run trained for the budget: iterations = round(F / (FLOPs/token x batch))
        assert abs(float(r["total_flops"]) - 3e9) <= float(r["total_flops"]) / int(r["num_iterations"])
        assert float(r["val_bpb"]) > 0
    assert int(rows[0]["num_iterations"]) > int(rows[1]["num_iterations"])  # the smaller model gets more steps
    assert "| flops3e9_d2 |" in (tmp_path / "results.md").read_text() and (tmp_path / "results.png").exists()
    # started again, finished points are skipped and nothing is appended twice
    p = _sweep("scaling_laws.py", assets, tmp_path, "--flops", "3e9", "--depths", "1,2")
    assert p.stdout.count("already in results.csv") == 2
    assert len(list(csv.DictReader(open(tmp_path / "results.csv")))) == 2


def test_miniseries(assets, tmp_path):
    _sweep("miniseries.py", assets, tmp_path, "--depths", "1", passthrough=("--num-iterations", "3"))
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["label"], r["num_iterations"], r["tokens_trained"]) for r in rows] == [("d1", "3", str(3 * 512))]
