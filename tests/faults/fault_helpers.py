"""Driving the real entry points as a user does (subprocesses) and checking what a fault leaves behind."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

USER_ERROR = 2  # exit status of every command for a user's mistake (modeling_nanochat/utils/errors.py)


def env(**extra) -> dict:
    """A quiet, offline environment without a user's NANOCHAT_* settings (NANOCHAT_DEBUG would show tracebacks)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run(*args, cwd=REPO, timeout: float = 300, extra_env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    """`python ARGS...` (a recipe path or `-m module`) as a user runs it; stdout/stderr captured as text."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env(**(extra_env or {})), **popen)


def user_error(res: subprocess.CompletedProcess, *fragments: str, code: int = USER_ERROR) -> str:
    """Assert a user error as every command reports one: exit status `code`, an `error:` line on stderr that
    contains every fragment (case-insensitive), no traceback. Returns the message from `error:` on."""
    out = f"exit {res.returncode}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-5000:]}"
    assert res.returncode == code, out
    assert "Traceback (most recent call last)" not in res.stderr + res.stdout, out
    assert "error:" in res.stderr, out
    message = res.stderr[res.stderr.index("error:"):]
    for f in fragments:
        assert f.lower() in message.lower(), f"{f!r} not in the message\n{out}"
    return message


def digest(path) -> dict[str, str]:
    """{relative path: sha256} of every file under `path`: equal before and after means nothing was touched."""
    root = Path(path)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def temp_leftovers(path) -> list[str]:
    """Half-written `.tmp-*` entries anywhere under `path` (utils/io's temp names)."""
    return sorted(str(p) for p in Path(path).rglob(".tmp-*"))


INJECT = Path(__file__).resolve().parent / "inject"  # sitecustomize.py: FAULT_KILL_ON_RENAME (a crash mid-save)

# a 2-layer, 64-wide model on T=64 rows (tests/pretrain/test_pretrain.py's size): seconds per run on a CPU
PRETRAIN_FLAGS = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
                  "--device-batch-size", "4", "--total-batch-size", "512", "--warmup-steps", "2",
                  "--eval-every", "-1", "--core-every", "-1", "--sample-every", "-1"]


def pretrain_assets(root: Path) -> Path:
    """Tiny parquet shards in root/data and the fixture tokenizer in root/tok."""
    from conftest import FIXTURES
    from test_pretrain_data import write_tiny_shards

    from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer, save_tokenizer

    write_tiny_shards(root / "data")
    save_tokenizer(convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer")), str(root / "tok"))
    return root


def pretrain_args(assets: Path, out, *extra) -> list[str]:
    return [str(REPO / "recipes" / "pretrain.py"), *PRETRAIN_FLAGS, "--tokenizer", str(assets / "tok"),
            "--data", str(assets / "data"), "--output-dir", str(out), *map(str, extra)]


def losses(run_dir) -> list[tuple[int, float]]:
    import json

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]
