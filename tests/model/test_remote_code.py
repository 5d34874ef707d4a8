"""A saved checkpoint loads in a process that has never seen our package: trust_remote_code=True, on transformers
5.x and on the 4.51-4.57 range (TGI runs remote code on 4.51). The legacy interpreters come from `.ci/run`, which
builds `.venv-tf<version>` venvs; point NANOCHAT_TF4_PYTHONS at others (os.pathsep-separated)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, IN_CI, REPO, clean_env
from modeling_nanochat.checkpoints.convert import convert

LOADER = r"""
import importlib.abc, sys


class _NotInstalled(importlib.abc.MetaPathFinder):
    # the package may be pip-installed in this interpreter (CI installs it editable): make it absent, as on a server
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_nanochat":
            raise ImportError(f"{name} is not installed here")


sys.meta_path.insert(0, _NotInstalled())
import json, torch, transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
ckpt, out = sys.argv[1], sys.argv[2]
try:
    import modeling_nanochat
    raise SystemExit("our package must not be importable here")
except ImportError:
    pass
golden = torch.load(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(ckpt, trust_remote_code=True)
cfg = AutoConfig.from_pretrained(ckpt, trust_remote_code=True)
with torch.no_grad():
    logits = model(golden["input_ids"]).logits
prompt = golden["prompt"][None]
n = len(golden["greedy_naive"])
kw = dict(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
greedy = model.generate(prompt, **kw)[0, prompt.shape[1]:].tolist()
greedy_nocache = model.generate(prompt, use_cache=False, **kw)[0, prompt.shape[1]:].tolist()
tok = transformers.AutoTokenizer.from_pretrained(ckpt)
chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
text_ids = tok("Hello world, 12345 <|bos|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
template_ids = tok.apply_chat_template(chat, tokenize=True)
template_ids = template_ids["input_ids"] if isinstance(template_ids, dict) or hasattr(template_ids, "keys") else template_ids
torch.save({"logits": logits}, out + ".pt")
json.dump({"module": type(model).__module__, "base": type(base).__name__, "config": type(cfg).__name__,
           "version": transformers.__version__, "greedy": greedy, "greedy_nocache": greedy_nocache,
           "tokenizer_class": type(tok).__name__, "text_ids": text_ids, "template_ids": list(template_ids)}, open(out, "w"))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("remote") / "ckpt"
    convert(str(FIXTURES / "nanochat_current"), str(out), tokenizer_dir=str(FIXTURES / "nanochat_tokenizer"))
    return out


def _legacy_pythons():
    listed = [p for p in os.environ.get("NANOCHAT_TF4_PYTHONS", "").split(os.pathsep) if p]
    found = sorted(str(p) for p in REPO.glob(".venv-tf4*/bin/python"))
    return listed or found


def _load_elsewhere(python, checkpoint, tmp_path):
    work = tmp_path / "elsewhere"  # a cwd without our package, and no PYTHONPATH
    work.mkdir(exist_ok=True)
    (work / "load.py").write_text(LOADER)
    out = work / "result.json"
    proc = subprocess.run([python, "load.py", str(checkpoint), str(out), str(FIXTURES / "nanochat_current" / "golden.pt")],
                          cwd=work, env=clean_env(HF_HOME=str(tmp_path / "hf_home")), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), torch.load(str(out) + ".pt")["logits"]


def _check(result, logits, checkpoint):
    golden = torch.load(FIXTURES / "nanochat_current" / "golden.pt")
    from transformers import AutoTokenizer
    from modeling_nanochat.tokenizer.chat_format import render_conversation
    tok = AutoTokenizer.from_pretrained(checkpoint)
    assert result["text_ids"] == tok("Hello world, 12345 <|bos|>", add_special_tokens=False,
                                     split_special_tokens=True)["input_ids"]
    chat = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
    assert result["template_ids"] == list(render_conversation(tok, chat)[0]), result["tokenizer_class"]
    assert result["module"].startswith("transformers_modules."), result["module"]
    assert result["base"] == "NanoChatHFModel" and result["config"] == "NanoChatConfig"
    assert (logits - golden["logits"]).abs().max().item() <= 1e-4
    assert result["greedy"] == golden["greedy_naive"].tolist() == result["greedy_nocache"]


@pytest.mark.slow
def test_fresh_process_without_package_loads_with_trust_remote_code(checkpoint, tmp_path):
    result, logits = _load_elsewhere(sys.executable, checkpoint, tmp_path)
    assert result["version"].startswith("5.")
    _check(result, logits, checkpoint)


@pytest.mark.slow
def test_remote_code_runs_on_transformers_4x(checkpoint, tmp_path):
    pythons = _legacy_pythons()
    if not pythons:
        if IN_CI:
            pytest.fail("no transformers-4.x venv: .ci/run must build .venv-tf4.51.3 (TGI's pin)")
        pytest.skip("no .venv-tf4*/bin/python (build one: python -m venv .venv-tf4.51.3 && "
                    ".venv-tf4.51.3/bin/pip install -c constraints/cpu.txt torch==2.13.0 transformers==4.51.3)")
    versions = []
    for python in pythons:
        result, logits = _load_elsewhere(python, checkpoint, tmp_path)
        versions.append(result["version"])
        _check(result, logits, checkpoint)
    assert any(v.startswith("4.51") for v in versions) or not IN_CI, versions
    print("remote code checked on transformers", versions)
