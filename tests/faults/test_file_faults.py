"""Broken and missing files, as a user meets them through the commands: a truncated or corrupt model, a config that
is not JSON or does not add up, a tokenizer of another model, damaged training state, paths that do not exist or
cannot be written. Each ends in one `error:` line naming the file and the fix (exit 2), and nothing is changed."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from app_helpers import tiny_checkpoint
from conftest import REPO, shared_path
from fault_helpers import digest, env, pretrain_args, pretrain_assets, run, temp_leftovers, user_error

CORE = ["-m", "evaluation.core", "--max-per-task", "2", "--no-progress"]
CHAT = ["-m", "modeling_nanochat.apps.chat", "--max-tokens", "4", "--prompt", "hi"]


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("good") / "model")[2]


@pytest.fixture
def model(good_model, tmp_path):
    """A fresh copy of the good model dir for the test to break."""
    return shutil.copytree(good_model, tmp_path / "model")


def _truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def _edit_config(model, **changes):
    cfg = json.loads((model / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (model / "config.json").write_text(json.dumps(cfg))


def _core(model, *extra):
    return run(*CORE, "--model", model, "--bundle", shared_path("core_sample"), *extra)


@pytest.mark.fault("Files", "truncated model.safetensors -> evaluation.core")
def test_truncated_weights_core(model, told):
    _truncate(model / "model.safetensors")
    told(user_error(_core(model), str(model / "model.safetensors"), "truncated", "fix:", "checkpoint"))


@pytest.mark.fault("Files", "truncated model.safetensors -> chat CLI")
def test_truncated_weights_chat(model, told):
    _truncate(model / "model.safetensors", keep=0.9)
    told(user_error(run(*CHAT, "--model", model), "model.safetensors", "truncated"))


@pytest.mark.fault("Files", "truncated model.safetensors -> convert --to nanochat")
def test_truncated_weights_convert(model, tmp_path, told):
    _truncate(model / "model.safetensors")
    res = run("-m", "modeling_nanochat.checkpoints.convert", "--input-dir", model, "--output-dir", tmp_path / "out",
              "--to", "nanochat")
    told(user_error(res, "model.safetensors", "truncated"))
    assert not (tmp_path / "out").exists() and temp_leftovers(tmp_path) == []


@pytest.mark.fault("Files", "truncated model.safetensors -> from_pretrained (library)")
def test_truncated_weights_from_pretrained(model, told):
    _truncate(model / "model.safetensors")
    code = ("import modeling_nanochat, sys\nfrom transformers import AutoModelForCausalLM\n"
            "AutoModelForCausalLM.from_pretrained(sys.argv[1])")
    res = run("-c", code, model)
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]  # a library call raises: the exception's line names file and fix
    assert last.startswith("OSError:") and str(model) in last and "truncated" in last and "earlier checkpoint" in last
    told(last)


@pytest.mark.fault("Files", "config.json that is not JSON -> chat CLI")
def test_config_not_json(model, told):
    (model / "config.json").write_text('{"model_type": "nanochat_hf", "depth": 4,')
    told(user_error(run(*CHAT, "--model", model), str(model / "config.json"), "not valid JSON"))


@pytest.mark.fault("Files", "config.json: hidden_size != heads x head_dim -> evaluation.core")
def test_config_inconsistent(model, told):
    _edit_config(model, hidden_size=96)
    told(user_error(_core(model), "config.json", "hidden_size=96", "num_attention_heads", "fix:"))


@pytest.mark.fault("Files", "config.json without model_type -> evaluation.core")
def test_config_without_model_type(model, told):
    _edit_config(model, model_type=None)
    told(user_error(_core(model), "config.json", "no model_type", '"model_type": "nanochat_hf"'))


@pytest.mark.fault("Files", "a tokenizer of another model (--tokenizer) -> evaluation.core")
def test_tokenizer_of_another_model(model, tmp_path, told):
    from modeling_nanochat.tokenizer.tokenizer import save_tokenizer, train_bpe

    text = shared_path("text_sample.txt").read_text(encoding="utf-8")
    save_tokenizer(train_bpe(text.split("\n"), 1024), str(tmp_path / "other_tok"))
    res = _core(model, "--tokenizer", tmp_path / "other_tok")
    told(user_error(res, str(tmp_path / "other_tok"), "vocabulary", "omit --tokenizer"))


@pytest.mark.fault("Files", "model dir without a tokenizer -> evaluation.core")
def test_model_without_tokenizer(model, told):
    (model / "tokenizer.json").unlink()
    told(user_error(_core(model), "no tokenizer", "tokenizer.json", "--tokenizer"))


@pytest.mark.fault("Files", "nonexistent path runs/nope -> evaluation.core (with and without ./runs)")
@pytest.mark.parametrize("runs_exists", [True, False], ids=["runs-dir-exists", "no-runs-dir"])
def test_nonexistent_path_core(tmp_path, runs_exists, told):
    if runs_exists:  # then runs/nope can only be a path; else it reads as a Hub repo id too (offline here)
        (tmp_path / "runs").mkdir()
    res = run(*CORE, "--model", "runs/nope-does-not-exist", cwd=tmp_path, extra_env={"PYTHONPATH": REPO})
    message = user_error(res, "no such directory: runs/nope-does-not-exist")
    assert "Repo id" not in res.stderr
    told(message)


@pytest.mark.fault("Files", "nonexistent path ./nope -> chat CLI")
def test_nonexistent_path_chat(tmp_path, told):
    told(user_error(run(*CHAT, "--model", "./nope", cwd=tmp_path), "no such directory", "./nope"))


@pytest.mark.fault("Files", "model path is a file -> evaluation.core")
def test_model_path_is_a_file(model, told):
    told(user_error(_core(model / "config.json"), "is a file", "directory"))


@pytest.mark.fault("Files", "a run dir instead of a model -> chat CLI names its newest model")
def test_run_dir_instead_of_model(model, tmp_path, told):
    run_dir = tmp_path / "myrun"
    shutil.copytree(model, run_dir / "checkpoint-20")
    message = user_error(run(*CHAT, "--model", run_dir), "not a model directory", str(run_dir / "checkpoint-20"))
    told(message)


@pytest.mark.fault("Files", "convert into a non-empty --output-dir without --overwrite")
def test_convert_refuses_to_overwrite(model, tmp_path, told):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = digest(out)
    res = run("-m", "modeling_nanochat.checkpoints.convert", "--input-dir", model, "--output-dir", out, "--to",
              "nanochat")
    told(user_error(res, str(out), "--overwrite"))
    assert digest(out) == before


def _without_dac_override(cmd):
    """`cmd` without root's power to write anywhere (so a read-only directory is read-only to this test as root)."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to test a read-only directory as root"
    drop = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}", "--", *cmd]


@pytest.mark.fault("Files", "read-only output directory -> convert")
def test_read_only_output_dir(model, tmp_path, told):
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        cmd = _without_dac_override([sys.executable, "-m", "modeling_nanochat.checkpoints.convert", "--input-dir",
                                     str(model), "--output-dir", str(parent / "out"), "--to", "nanochat"])
        res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        told(user_error(res, str(parent / "out"), "permission denied", "writable"))
        assert os.listdir(parent) == []
    finally:
        parent.chmod(0o755)


# -- training state (pretraining --resume) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    assets = pretrain_assets(tmp_path_factory.mktemp("resume"))
    out = assets / "run"
    res = run(*pretrain_args(assets, out, "--num-iterations", 4, "--save-every", 2))
    assert res.returncode == 0, res.stderr[-3000:]
    return assets, out


@pytest.mark.slow
@pytest.mark.fault("Files", "--resume: checkpoints without training state")
def test_resume_without_training_state(pretrain_run, tmp_path, told):
    assets, src = pretrain_run
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(src / "checkpoint-4", out / "checkpoint-4", ignore=shutil.ignore_patterns("training_state"))
    before = digest(out)
    res = run(*pretrain_args(assets, out, "--num-iterations", 6, "--resume"))
    told(user_error(res, "nothing to resume", "checkpoint-4", "trainer_state.json", "--overwrite"))
    assert digest(out) == before


@pytest.mark.slow
@pytest.mark.fault("Files", "--resume: corrupt optimizer state in the last checkpoint")
def test_resume_with_corrupt_training_state(pretrain_run, tmp_path, told):
    assets, src = pretrain_run
    out = shutil.copytree(src, tmp_path / "run")
    _truncate(out / "checkpoint-4" / "training_state" / "optimizer.pt")
    before = digest(out)
    res = run(*pretrain_args(assets, out, "--num-iterations", 6, "--resume"))
    told(user_error(res, str(out / "checkpoint-4"), "unreadable", "resume from the one before"))
    assert digest(out) == before


@pytest.mark.slow
@pytest.mark.fault("Files", "corrupt token_bytes.pt beside the tokenizer -> pretraining")
def test_corrupt_token_bytes(pretrain_run, tmp_path, told):
    assets, _ = pretrain_run
    tok = shutil.copytree(assets / "tok", tmp_path / "tok")
    (tok / "token_bytes.pt").write_bytes(b"not a tensor")
    args = pretrain_args(assets, tmp_path / "out", "--num-iterations", 2)
    args[args.index("--tokenizer") + 1] = str(tok)
    told(user_error(run(*args), str(tok / "token_bytes.pt"), "unreadable", "delete"))


@pytest.mark.slow
@pytest.mark.fault("Files", "missing token_bytes.pt -> computed from the tokenizer")
def test_missing_token_bytes_is_computed(pretrain_run, tmp_path, told):
    assets, src = pretrain_run
    tok = shutil.copytree(assets / "tok", tmp_path / "tok")
    (tok / "token_bytes.pt").unlink()
    args = pretrain_args(assets, tmp_path / "out", "--num-iterations", 4, "--save-every", 2, "--eval-every", 4,
                         "--eval-tokens", 1024)
    args[args.index("--tokenizer") + 1] = str(tok)
    res = run(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    bpb = [r["val_bpb"] for r in rows if "val_bpb" in r]
    assert bpb and all(b > 0 for b in bpb)
    told(f"trained; val bpb {bpb[-1]:.4f} from token byte counts computed from the tokenizer")
