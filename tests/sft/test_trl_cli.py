"""The stock HF path: `trl sft|grpo --config recipes/trl/*_tiny.yaml` on a tiny checkpoint, offline, in a fresh
process that loads the model by remote code; LoRA trains only the adapters and its merged export reloads with the
PEFT model's logits.

The training processes run with a `sitecustomize` (below) that hides our model code: `modeling_nanochat.
modeling_nanochat` / `.configuration_nanochat` cannot be imported, and the package's `__init__` (which registers the
model with the Auto classes) never runs. The GRPO reward `modeling_nanochat.rl.rewards.gsm8k_reward` still imports,
from the package folder, as it does for a user who runs `trl grpo` from the checkout."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, REPO, clean_env, perturbed_model, shared_path, tiny_config

RECIPES = REPO / "recipes" / "trl"
REMOTE = "NANOCHAT-TEST model module:"

# Runs at start-up of every Python process of the CLI (the `trl` launcher, `accelerate launch`, the trainer).
HIDE_MODEL_CODE = r'''
import atexit, importlib.abc, os, sys, types

_HIDDEN = ("modeling_nanochat.modeling_nanochat", "modeling_nanochat.configuration_nanochat")


class _NoModelCode(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in _HIDDEN:
            raise ImportError(f"{name} is hidden: the model must come from the checkpoint's remote code")


sys.meta_path.insert(0, _NoModelCode())
_pkg = types.ModuleType("modeling_nanochat")  # the package without its __init__ (which registers the model)
_pkg.__path__ = [os.path.join(os.environ["NANOCHAT_REPO"], "modeling_nanochat")]
sys.modules["modeling_nanochat"] = _pkg
sys.path.append(os.environ["NANOCHAT_REPO"])  # `evaluation` (the reward's grader) when the checkout is not installed


@atexit.register
def _report():
    model_modules = sorted(m for m in sys.modules if m.endswith(".modeling_nanochat"))
    if model_modules:
        print("NANOCHAT-TEST model module:", ",".join(model_modules), flush=True)
'''


def _trl_command():
    script = Path(sys.executable).with_name("trl")  # the console script of this interpreter's environment
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from trl.cli import main; sys.argv[0] = 'trl'; sys.exit(main())"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_cli")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(HIDE_MODEL_CODE)
    (root / "cwd").mkdir()  # a working directory without our package in it
    return root


@pytest.fixture(scope="module")
def base_ckpt(work):
    """A tiny checkpoint as the project writes them: weights, config with auto_map, remote-code files, tokenizer."""
    from modeling_nanochat.checkpoints.convert import save_hf_checkpoint
    from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer

    config = tiny_config()
    model = perturbed_model(config)
    tokenizer = convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))
    return Path(save_hf_checkpoint(model.state_dict(), config, str(work / "base"), tokenizer=tokenizer))


def _prepare(*argv):
    sys.path.insert(0, str(REPO / "recipes"))
    import prepare_chat_data

    prepare_chat_data.main(list(argv))


@pytest.fixture(scope="module")
def sft_sources(work):
    """sft_data's local layout: GSM8K train rows (calculator calls) plus a JSONL of conversations, one with a tool call."""
    data = work / "sft_sources"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "train.jsonl").write_text(shared_path("gsm8k", "train_sample.jsonl").read_text())
    extra = work / "identity.jsonl"
    extra.write_text("".join(json.dumps(c) + "\n" for c in [
        [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am nanochat."}],
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12*12?"},
                      {"role": "assistant", "content": [{"type": "python", "text": "12*12"},
                                                        {"type": "python_output", "text": "144"},
                                                        {"type": "text", "text": "It is 144."}]}]},
    ]))
    return dict(data_dir=str(data), smoltalk_epochs=0, mmlu_epochs=0, gsm8k_epochs=2, extra_jsonl=[f"{extra}:2"])


@pytest.fixture(scope="module")
def sft_data(work, sft_sources):
    out = work / "sft_data"
    _prepare("sft", "--output-dir", str(out), "--data-dir", sft_sources["data_dir"], "--smoltalk-epochs", "0",
             "--mmlu-epochs", "0", "--gsm8k-epochs", "2", "--extra-jsonl", sft_sources["extra_jsonl"][0], "--no-val")
    return out


@pytest.fixture(scope="module")
def grpo_data(work):
    out = work / "grpo_data"
    _prepare("grpo", "--output-dir", str(out), "--gsm8k", str(shared_path("gsm8k", "train_sample.jsonl")))
    return out


def run_trl(work, command, recipe, *overrides):
    env = clean_env(PYTHONPATH=str(work / "site"), NANOCHAT_REPO=str(REPO), HF_HOME=str(work / "hf_home"),
                    TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([*_trl_command(), command, "--config", str(RECIPES / recipe), *overrides], cwd=work / "cwd",
                          env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "Training completed" in log, log[-3000:]
    modules = ",".join(re.findall(rf"{REMOTE} (\S+)", log)).split(",")
    assert any(m.startswith("transformers_modules.") for m in modules), modules  # the checkpoint's own code ran
    assert "modeling_nanochat.modeling_nanochat" not in modules  # and our package's did not
    losses = [float(x) for x in re.findall(r"'loss': '([^']+)'", log)]
    assert losses and all(math.isfinite(x) for x in losses), log[-3000:]
    return log


def assert_our_model(out):
    """What the trainer trained and saved is our architecture. transformers has a different model of its own named
    NanoChatForCausalLM (model_type "nanochat"); had TRL picked that class, the saved config would be its config."""
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["model_type"] == "nanochat_hf"
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_nanochat.")
    assert (out / "modeling_nanochat.py").is_file()


def test_checkpoint_architecture_is_not_a_transformers_class(base_ckpt):
    """TRL's loader (trl.trainer.utils.create_model_from_path) resolves config.json's `architectures[0]` with
    getattr(transformers, name) before it looks at auto_map. transformers ships its own, different nanochat model, so
    a checkpoint naming `NanoChatForCausalLM` would be trained as *that* model (weights dropped, wrong layers)."""
    import transformers

    with open(base_ckpt / "config.json") as f:
        architecture = json.load(f)["architectures"][0]
    assert getattr(transformers, architecture, None) is None, (
        f"config.json names {architecture!r}, which is transformers' own class: TRL would load it instead of the "
        "checkpoint's code; our model classes need names of their own")


@pytest.mark.slow
def test_trl_sft_cli(work, base_ckpt, sft_data):
    out = work / "sft_out"
    run_trl(work, "sft", "sft_tiny.yaml", "--model_name_or_path", str(base_ckpt), "--dataset_name", str(sft_data),
            "--output_dir", str(out))
    assert_our_model(out)
    before, after = load_file(base_ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.slow
def test_trl_grpo_cli(work, base_ckpt, grpo_data):
    out = work / "grpo_out"
    log = run_trl(work, "grpo", "grpo_tiny.yaml", "--model_name_or_path", str(base_ckpt), "--dataset_name",
                  str(grpo_data), "--output_dir", str(out))
    assert "rewards/gsm8k_reward/mean" in log  # our reward was called on the sampled completions
    assert len(re.findall(r"'loss': ", log)) == 2  # max_steps
    assert_our_model(out)


def test_prepared_sft_data_renders_to_the_faithful_mixture(base_ckpt, sft_data, sft_sources):
    """What `trl sft` trains on (each conversation through the chat template with the assistant mask, as TRL's
    assistant_only_loss tokenizes it) is recipes/sft.py's mixture, token for token, mask for mask, in the same order:
    calculator calls supervised, their outputs not."""
    from datasets import load_dataset

    from modeling_nanochat.sft.data import build_sft_mixture
    from modeling_nanochat.tokenizer.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(base_ckpt))
    rows = load_dataset(str(sft_data))["train"]
    mixture = build_sft_mixture(tokenizer, "train", **sft_sources)
    assert len(rows) == len(mixture) == 40 * 2 + 2 * 2
    tool_rows = 0
    for i, row in enumerate(rows):
        out = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = mixture[i]
        assert out["input_ids"] == list(ids), i
        assert out["assistant_masks"] == list(mask), i
        tool_rows += any(isinstance(m["content"], list) for m in row["messages"])
    assert tool_rows == len(rows) - 2  # every GSM8K row and the tool-call conversation keep their parts


def test_lora_sft_trains_only_adapters(base_ckpt, sft_data, tmp_path):
    """sft_lora_tiny.yaml's ModelConfig through TrlParser and `lora.wrap_model` (what our recipes call), trained by
    SFTTrainer: the base weights stay bit-identical, every adapter B (initialised to 0) moves."""
    from datasets import load_dataset
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser

    from modeling_nanochat import NanoChatForCausalLM
    from modeling_nanochat.adapters import lora
    from modeling_nanochat.tokenizer.tokenizer import load_tokenizer

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig))
    with mock.patch.dict(os.environ):  # the YAML's env block writes os.environ
        _, args, model_args, _ = parser.parse_args_and_config(
            ["--config", str(RECIPES / "sft_lora_tiny.yaml"), "--output_dir", str(tmp_path / "out")])
    assert model_args.use_peft and set(model_args.lora_target_modules) == set(lora.LORA_TARGET_MODULES)
    model = lora.wrap_model(NanoChatForCausalLM.from_pretrained(str(base_ckpt)), model_args)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == set(lora.LORA_TARGET_MODULES)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset(str(sft_data))["train"],
                         processing_class=load_tokenizer(str(base_ckpt)))
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert before.keys() == after.keys()
    for name, p in after.items():
        if name in trainable:
            if ".lora_B." in name:
                assert before[name].abs().max() == 0 and p.detach().abs().max() > 0, name
        else:
            assert torch.equal(before[name], p.detach()), f"base weight {name} changed"


LOGITS = r"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float64).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
"""


@pytest.mark.slow
def test_trl_lora_cli_and_merged_export(work, base_ckpt, sft_data):
    """`trl sft` with use_peft saves an adapter of nanochat's block matrices; `python -m modeling_nanochat.adapters.lora merge`
    writes a checkpoint that a process without our package loads by remote code, with the PEFT model's logits.

    Both sides run in float64, so the comparison sees what the merge changed (the fp32 weights it wrote) and not
    fp32's evaluation-order noise: on this deliberately sharp tiny model (logits up to ~15), the base model alone
    differs by ~2.5e-5 between an fp32 and an fp64 forward."""
    from peft import PeftModel

    from modeling_nanochat import NanoChatForCausalLM
    from modeling_nanochat.adapters import lora

    adapter = work / "lora_out"
    run_trl(work, "sft", "sft_lora_tiny.yaml", "--model_name_or_path", str(base_ckpt), "--dataset_name",
            str(sft_data), "--output_dir", str(adapter))
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights} == set(lora.LORA_TARGET_MODULES)
    assert all(w.abs().max() > 0 for k, w in weights.items() if ".lora_B." in k)  # trained (B starts at 0)

    merged = work / "lora_merged"
    lora.main(["merge", "--adapter", str(adapter), "--output-dir", str(merged)])  # python -m modeling_nanochat.adapters.lora
    for name in ("config.json", "generation_config.json", "modeling_nanochat.py", "configuration_nanochat.py",
                 "tokenizer.json", "tokenizer_config.json", "token_bytes.pt"):
        assert (merged / name).is_file(), name
    assert_our_model(merged)

    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    torch.save(ids, work / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", LOGITS, str(merged), str(work / "ids.pt"), str(work / "merged.pt")],
                          cwd=work / "cwd", env=clean_env(PYTHONPATH=str(work / "site"), NANOCHAT_REPO=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = NanoChatForCausalLM.from_pretrained(str(base_ckpt), dtype=torch.float64).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        expected = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
    got = torch.load(work / "merged.pt")
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter matters, so equality below is not the base's
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_qlora_config_or_a_clear_error():
    """QLoRA where bitsandbytes and a GPU are present (4-bit, gates and lm_head kept in full precision), else an error
    that names what is missing and the way out."""
    import importlib.util

    from modeling_nanochat.adapters import lora

    args = mock.Mock(load_in_4bit=True, load_in_8bit=False, dtype="bfloat16", bnb_4bit_quant_type="nf4",
                     use_bnb_nested_quant=False)
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="(bitsandbytes|CUDA GPU).*plain LoRA"):
            lora.quantization_config(args)
    else:
        config = lora.quantization_config(args)
        assert config.load_in_4bit and set(config.llm_int8_skip_modules) == {"lm_head", "smear_gate", "ve_gate"}
    assert lora.quantization_config(mock.Mock(load_in_4bit=False, load_in_8bit=False)) is None


def test_merge_refuses_what_is_not_a_lora_adapter(base_ckpt, tmp_path):
    from modeling_nanochat.adapters import lora

    with pytest.raises(FileNotFoundError, match="adapter_config.json.*needs no merge"):
        lora.merge_adapter(str(base_ckpt), str(tmp_path / "merged"))
