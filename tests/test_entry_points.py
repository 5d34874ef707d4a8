"""Every command in pyproject's [project.scripts] points at a real function and answers --help (the installed
console script where the environment has it, else the same function)."""

import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import pytest
from conftest import REPO, clean_env

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_there_are_commands_for_the_main_tools():
    assert {"nanochat-chat", "nanochat-convert", "nanochat-eval-core", "nanochat-eval-chat", "nanochat-serve",
            "nanochat-publish"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_command_points_at_a_function(name):
    module, _, func = SCRIPTS[name].partition(":")
    assert callable(getattr(import_module(module), func))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_command_answers_help(name):
    module, _, func = SCRIPTS[name].partition(":")
    installed = Path(sys.executable).with_name(name)
    cmd = [str(installed)] if installed.exists() else [sys.executable, "-c", f"import sys; from {module} import "
                                                                           f"{func}; sys.exit({func}())", name]
    if name == "nanochat-serve":
        cmd.append("--help")  # serve passes its options on to `transformers serve`: it needs a checkpoint first
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=clean_env())
        assert p.returncode != 0 and "usage" in (p.stdout + p.stderr)
        return
    p = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120, env=clean_env())
    assert p.returncode == 0, p.stderr[-2000:]
    assert "usage" in p.stdout.lower()
