"""The smear as attention (modeling_nanochat/engines/smear.py), checked with plain attention arithmetic: the window-2
layer returns exactly the previous token's embedding, bit for bit, at any position and in fp32 and bf16. The same
layer inside vLLM's paged cache is checked end to end in test_vllm_serving.py."""

import importlib
import importlib.metadata
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from modeling_nanochat.engines.smear import SMEAR_WINDOW, smear_query_key


def window_attention(q, k, v, positions, window):
    """softmax(q k^T) v over each token's last `window` keys of its own sequence (a new sequence where positions
    restart), fp32 softmax as attention kernels compute it. q, k, v: (T, H, D)."""
    t = torch.arange(q.shape[0])
    same_seq = (positions[:, None] - positions[None, :]) == (t[:, None] - t[None, :])
    allowed = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window) & same_seq
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()).masked_fill(~allowed, float("-inf"))
    weights = F.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v.float()).to(v.dtype), weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 7, 1_000_001])
def test_window_two_returns_the_previous_embedding_exactly(dtype, start):
    torch.manual_seed(0)
    n, heads, head_dim = 40, 2, 64
    positions = torch.arange(start, start + n)
    x = torch.randn(n, heads, head_dim).to(dtype) * 3
    q, k = smear_query_key(positions, heads, head_dim, dtype)
    out, weights = window_attention(q, k, x, positions, SMEAR_WINDOW)
    assert torch.equal(out[1:], x[:-1])  # every token but the first of the row gets its predecessor, bit for bit
    assert torch.all(weights.diagonal(dim1=1, dim2=2)[:, 1:] == 0)  # the current token weighs exactly 0
    # a window of 3 (should an engine count the window without the query) selects the same token
    out3, _ = window_attention(q, k, x, positions, SMEAR_WINDOW + 1)
    assert torch.equal(out3[1:], x[:-1])


def test_sequences_in_one_flat_batch_do_not_read_each_other():
    """Continuous batching flattens sequences into one row; each reads only its own predecessor. (The first token
    of a sequence reads itself: the model masks it by `positions > 0`.)"""
    positions = torch.cat([torch.arange(0, 5), torch.arange(0, 3), torch.arange(12, 16)])
    x = torch.randn(len(positions), 1, 32)
    q, k = smear_query_key(positions, 1, 32, x.dtype)
    out, _ = window_attention(q, k, x, positions, SMEAR_WINDOW)
    for i in range(1, len(positions)):
        expected = x[i - 1] if positions[i] == positions[i - 1] + 1 else x[i]
        assert torch.equal(out[i], expected), i


def test_the_package_declares_its_vllm_plugin_and_imports_no_vllm():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.value == "modeling_nanochat.engines:register_vllm"]
    assert ours, "pyproject.toml's vllm.general_plugins entry point is not installed (pip install -e .)"
    engines = importlib.import_module(ours[0].module)
    assert callable(getattr(engines, ours[0].attr))
    # importing the package and its engines folder must not import vLLM (a fresh interpreter tells)
    code = "import sys, modeling_nanochat.engines, modeling_nanochat.engines.smear; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
