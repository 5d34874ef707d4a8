"""What a command prints before it does anything: the known start-up warnings of torchao, torch and DeepSpeed on a
CPU-only torch are dropped by our package (modeling_nanochat/__init__.py), and nothing else is."""

import logging
import subprocess
import sys

import pytest
import torch
from conftest import REPO, clean_env

pytest.importorskip("torchao")
pytest.importorskip("deepspeed")

NOISE = ("Failed to load ", "is an Enum subclass and is now natively supported", "Setting accelerator to CPU")
CPU_BUILD = torch.version.cuda is None and getattr(torch.version, "hip", None) is None


def _output(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_the_noise_is_there_without_our_package_and_gone_with_it():
    """The first half fails once torchao, torch or DeepSpeed stop printing these: then the filter can go."""
    bare = _output("import torchao, deepspeed")
    expected = NOISE if CPU_BUILD else NOISE[1:2]
    assert all(n in bare for n in expected), bare[-3000:]
    ours = _output("import modeling_nanochat, torchao, deepspeed")
    assert not any(n in ours for n in expected), ours[-3000:]


def test_only_those_records_are_dropped(caplog):
    import modeling_nanochat  # noqa: F401 - installs the filters

    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        logging.getLogger("torchao").warning("torchao: something else went wrong")
        logging.getLogger("torch.utils._pytree").warning(
            "<enum 'X'> is an Enum subclass and is now natively supported by torch.compile as an opaque value type.")
        logging.getLogger("torch.utils._pytree").warning("another pytree warning")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == (["torchao: something else went wrong", "another pytree warning"] if CPU_BUILD else
                        ["Failed to load /x/_C_mxfp8.so: Could not load this library",
                         "torchao: something else went wrong", "another pytree warning"])
