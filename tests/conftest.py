"""Shared test helpers: where fixtures and ../shared live, tiny configs, and a clean subprocess environment."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SHARED = REPO.parent / "shared"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

sys.path.insert(0, str(REPO))  # tests run from a checkout; the package need not be pip-installed

# The vLLM tests need vLLM, which lives in its own environment (it pins its own transformers): .ci/run runs them
# there, in its vLLM lane, against the tiny speedrun's model. Elsewhere they are not collected (neither failed nor
# skipped); the rest of tests/engines runs everywhere.
collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["engines/test_vllm_serving.py"]


def shared_path(*parts):
    """A path under ../shared/data. Skips (with a reason) on a user's machine without it; CI must have it."""
    p = SHARED.joinpath("data", *parts)
    if not p.exists():
        if IN_CI:
            pytest.fail(f"{p} is missing: CI must run the shared-data tests (.ci/run checks out ../shared)")
        pytest.skip(f"{p} not present (the ../shared data sits beside the checkout in CI)")
    return p


def tiny_config(**overrides):
    from modeling_nanochat import NanoChatConfig
    kw = dict(depth=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
              max_position_embeddings=256)
    kw.update(overrides)
    return NanoChatConfig(**kw)


def perturbed_model(config, seed=0, scale=0.2):
    """A model whose every parameter matters (nanochat zero-inits projections and disables smear at init)."""
    from modeling_nanochat import NanoChatForCausalLM
    torch.manual_seed(seed)
    model = NanoChatForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = 1.0 if name == "lm_head.weight" else scale
            p.add_(torch.randn(p.shape, generator=g) * s)
    return model


def clean_env(**extra):
    """Environment for a subprocess that must not see our package (as on a server or another machine)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


# the fault catalogue (tests/faults): the `told` fixture and the table of faults printed after the run (the path
# is added for processes that import this module outside pytest, as test workers do)
sys.path.append(str(REPO / "tests" / "faults"))
from fault_table import pytest_runtest_makereport, pytest_terminal_summary, told  # noqa: E402,F401
