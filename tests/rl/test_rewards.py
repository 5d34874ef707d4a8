"""Rewards by name: the REWARDS registry, dotted paths to a user's own function, the errors a config typo gets, and
recipes/grpo.py's reward_funcs flag (parsed from its YAMLs and the command line, resolved before any model loads)."""

import runpy
import sys
import textwrap

import pytest
import yaml
from conftest import REPO

from modeling_nanochat.rl import rewards
from modeling_nanochat.rl.rewards import REWARDS, gsm8k_reward, register_reward, resolve_reward, resolve_rewards


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes a module into tmp_path, importable by name for this test only (sys.path and sys.modules restored)."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name, source):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, name, raising=False)  # a same-named module from elsewhere must not win
        return name

    yield write


@pytest.fixture
def registry(monkeypatch):
    """A copy of REWARDS for the test to add to; the module's own dict is put back afterwards."""
    monkeypatch.setattr(rewards, "REWARDS", dict(REWARDS))
    return rewards.REWARDS


def test_registered_name_resolves():
    assert resolve_reward("gsm8k") is gsm8k_reward
    assert resolve_rewards(["gsm8k"]) == [gsm8k_reward]
    assert resolve_rewards("gsm8k") == [gsm8k_reward]  # one string is one spec, not one per letter
    assert resolve_reward("modeling_nanochat.rl.rewards.gsm8k_reward") is gsm8k_reward  # the `trl grpo` YAML form


def test_dotted_path_to_a_user_function_resolves_and_is_called(user_module):
    name = user_module("my_test_rewards", """
        def length_reward(prompts, completions, **kwargs):
            return [float(len(c)) for c in completions]
    """)
    func = resolve_reward(f"{name}.length_reward")
    assert func.__module__ == name and func.__name__ == "length_reward"
    assert func(prompts=[None, None], completions=["ab", "abcd"], answer=["#### 1", "#### 2"]) == [2.0, 4.0]
    assert resolve_rewards(["gsm8k", f"{name}.length_reward"]) == [gsm8k_reward, func]


@pytest.mark.parametrize("spec, problem", [
    ("gsm9k", "no reward is registered under that name"),
    ("no_such_package_xyz.reward", "module 'no_such_package_xyz' cannot be imported"),
    ("modeling_nanochat.rl.rewards.no_such_reward", "has no attribute 'no_such_reward'"),
    ("modeling_nanochat.rl.rewards.REWARDS", "is a dict, not a function"),
    ("", "expected a name or a dotted path"),
])
def test_unresolvable_specs_name_the_problem_and_the_ways_out(spec, problem):
    with pytest.raises(ValueError) as err:
        resolve_reward(spec)
    message = str(err.value)
    assert problem in message and repr(spec) in message
    assert "gsm8k" in message and "package.module.function" in message  # the known names and the dotted form


def test_a_user_module_that_fails_to_import_is_reported(user_module):
    name = user_module("my_broken_rewards", "import no_such_dependency_xyz\n")
    with pytest.raises(ValueError, match="no_such_dependency_xyz") as err:
        resolve_reward(f"{name}.reward")
    assert isinstance(err.value.__cause__, ImportError)


def test_no_rewards_is_an_error():
    with pytest.raises(ValueError, match="no reward functions"):
        resolve_rewards([])


def test_registered_reward_resolves_by_name(registry):
    @register_reward("always_one")
    def always_one(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    assert registry["always_one"] is always_one and resolve_reward("always_one") is always_one
    assert resolve_rewards(["always_one", "gsm8k"]) == [always_one, gsm8k_reward]
    register_reward("always_one")(always_one)  # the same function again (a module imported twice) is fine
    with pytest.raises(ValueError, match="already registered"):
        register_reward("gsm8k")(always_one)  # replacing a name would silently change every config using it
    with pytest.raises(ValueError, match="without dots"):
        register_reward("my.reward")  # a dotted name could not be told from a dotted path
    with pytest.raises(ValueError, match="always_one"):
        resolve_reward("no_such_name")  # the error lists the new name too


def test_registry_is_restored_after_registering():
    assert "always_one" not in REWARDS and rewards.REWARDS is REWARDS


# recipes/grpo.py: the flag, from its YAMLs and the command line


@pytest.fixture(scope="module")
def recipe():
    return runpy.run_path(str(REPO / "recipes" / "grpo.py"), run_name="imported_by_test")


@pytest.mark.parametrize("config", ["default.yaml", "tiny_cpu.yaml", "speedrun_tiny.yaml"])
def test_recipe_yamls_name_registered_rewards(config):
    specs = yaml.safe_load((REPO / "recipes" / "grpo" / config).read_text())["reward_funcs"]
    assert resolve_rewards(specs) == [gsm8k_reward]


def test_recipe_parser_takes_reward_funcs_from_yaml_and_flags(recipe, tmp_path, user_module):
    config = str(REPO / "recipes" / "grpo" / "tiny_cpu.yaml")
    out = ["--output_dir", str(tmp_path / "out")]
    rl_args, training_args, _ = recipe["make_parser"]().parse_args_and_config(["--config", config, *out])
    assert rl_args.reward_funcs == ["gsm8k"]
    assert not hasattr(training_args, "reward_funcs")  # GRPOConfig has no such field: nothing for TrlParser to clash

    name = user_module("my_flag_rewards", """
        def zero(prompts, completions, **kwargs):
            return [0.0] * len(completions)
    """)
    flags = ["--reward_funcs", "gsm8k", f"{name}.zero"]
    rl_args, _, _ = recipe["make_parser"]().parse_args_and_config(["--config", config, *out, *flags])
    assert rl_args.reward_funcs == ["gsm8k", f"{name}.zero"]  # the flag overrides the YAML
    assert [f.__name__ for f in resolve_rewards(rl_args.reward_funcs)] == ["gsm8k_reward", "zero"]

    bare = tmp_path / "bare.yaml"  # a config without the key gets the default
    bare.write_text("use_cpu: true\nbf16: false\nactivation_checkpointing: false\nreport_to: none\n")
    rl_args, _, _ = recipe["make_parser"]().parse_args_and_config(["--config", str(bare), *out])
    assert rl_args.reward_funcs == ["gsm8k"]


def test_recipe_rejects_an_unknown_reward_before_loading_the_model(recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() appends the launch directory
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "recipes" / "grpo" / "tiny_cpu.yaml")
    args = ["--config", config, "--output_dir", str(tmp_path / "out"), "--reward_funcs", "gsm8k", "gsm9k",
            "--model_name_or_path", str(tmp_path / "no_model_here")]
    parsed = recipe["make_parser"]().parse_args_and_config(args)
    with pytest.raises(ValueError, match="'gsm9k'"):  # not OSError from from_pretrained: nothing was loaded
        recipe["main"](*parsed)


def test_recipe_rejects_a_non_positive_rollout_rows_before_loading_the_model(recipe, tmp_path):
    args = ["--config", str(REPO / "recipes" / "grpo" / "tiny_cpu.yaml"), "--output_dir", str(tmp_path / "out"),
            "--rollout_rows", "0", "--model_name_or_path", str(tmp_path / "no_model_here")]
    parsed = recipe["make_parser"]().parse_args_and_config(args)
    assert parsed[0].rollout_rows == 0
    with pytest.raises(ValueError, match=r"rollout_rows=0: set a positive number"):
        recipe["main"](*parsed)
