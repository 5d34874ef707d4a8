"""`python -m modeling_nanochat.apps.chat` in a subprocess on a tiny checkpoint: the greedy reply it prints equals what
transformers' own `generate()` produces from the same conversation tokens (one-shot and over stdin, with `clear`
and `quit`), the default model is the newest under runs/, and tool calls are shown readably."""

import io
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import FIXTURES, REPO, perturbed_model, tiny_config
from test_tool_generation import _nanochat, wired_model

from modeling_nanochat.apps.chat import ChatSession, main, print_reply
from modeling_nanochat.checkpoints.model_dirs import newest_model, resolve_model
from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer, encode_ordinary, save_tokenizer

MAX_TOKENS = 24
SPECIALS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


@pytest.fixture(scope="module")
def tok():
    return convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tok):
    """cwd for the CLI: runs/tiny/ holds the final model (and an older checkpoint that must not be picked)."""
    work = tmp_path_factory.mktemp("chat")
    model = perturbed_model(tiny_config(), seed=3)
    with torch.no_grad():  # tool tokens get logit 0, below the max of ~500 random logits: greedy never calls the
        for t in SPECIALS:  # tool here (the next test covers tool calls)
            model.lm_head.weight[tok.convert_tokens_to_ids(t)] = 0
    ckpt = work / "runs" / "tiny" / "checkpoint-5"
    for d in (ckpt, ckpt.parent):
        model.save_pretrained(d)
        save_tokenizer(tok, str(d))
    (ckpt / "training_state").mkdir()
    return work, model


def _run(workdir, *args, stdin=""):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8",
           "OMP_NUM_THREADS": "1"}  # a tiny model gains nothing from threads, which thrash on a busy machine
    proc = subprocess.run([sys.executable, "-m", "modeling_nanochat.apps.chat", "-t", "0", "--max-tokens", str(MAX_TOKENS),
                           *args], cwd=workdir, env=env, input=stdin.encode(), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc.stdout.decode("utf-8")  # bytes: no newline translation of whatever the model writes


def _greedy(model, tok, ids):
    """Reference: transformers' generate() (not our tool loop), stopping where the CLI stops."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(ids):].tolist()
    stops = {tok.convert_tokens_to_ids(t) for t in ("<|assistant_end|>", "<|bos|>")}
    for i, t in enumerate(out):
        if t in stops:
            out = out[: i + 1]
            break
    assert not {tok.convert_tokens_to_ids(t) for t in SPECIALS} & set(out), "pick a prompt without a tool call"
    text = tok.decode([t for t in out if t not in stops])
    closed = out if out[-1] == tok.convert_tokens_to_ids("<|assistant_end|>") else \
        out + [tok.convert_tokens_to_ids("<|assistant_end|>")]
    return text, closed


def _turn(tok, text):
    sid = tok.convert_tokens_to_ids
    return [sid("<|user_start|>"), *encode_ordinary(tok, text), sid("<|user_end|>"), sid("<|assistant_start|>")]


@pytest.mark.slow
def test_one_shot_prompt_prints_the_greedy_reply_of_the_newest_model(workdir, tok):
    work, model = workdir
    out = _run(work, "-p", "Why is the sky blue?")  # no --model: runs/tiny (final model, not checkpoint-5)
    expected, _ = _greedy(model, tok, [tok.convert_tokens_to_ids("<|bos|>"), *_turn(tok, "Why is the sky blue?")])
    assert len(expected) > 5
    assert out == expected + "\n"


@pytest.mark.slow
def test_interactive_two_turns_clear_and_quit(workdir, tok):
    work, model = workdir
    q1, q2 = "Hello there", "And then what?"
    out = _run(work, "--model", "runs/tiny", stdin=f"{q1}\n{q2}\nclear\n{q1}\nquit\n")
    bos = tok.convert_tokens_to_ids("<|bos|>")
    r1, closed1 = _greedy(model, tok, [bos, *_turn(tok, q1)])
    r2, _ = _greedy(model, tok, [bos, *_turn(tok, q1), *closed1, *_turn(tok, q2)])
    assert r1 != r2  # the second turn saw the first
    user, assistant = "\nUser: ", "\nAssistant: "
    expected = (user + assistant + r1 + "\n" + user + assistant + r2 + "\n" + user + "Conversation cleared.\n"
                + user + assistant + r1 + "\n" + user + "Goodbye!\n")
    assert out[out.index(user):] == expected


@pytest.mark.parametrize("stdin", ["", "exit\n"], ids=["end-of-input", "exit"])
def test_end_of_input_and_exit_leave(workdir, stdin, monkeypatch, capsys):
    work, _ = workdir
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["--model", str(work / "runs" / "tiny")]) == 0
    assert capsys.readouterr().out.endswith("Goodbye!\n")


def test_tool_call_and_result_are_shown_inline(tok):
    model, _ = wired_model(_nanochat, tok, "2+3")  # answers with a calculator call; the tool forces its result
    session = ChatSession(model, tok, temperature=0.0, max_tokens=32)
    buf = io.StringIO()
    print_reply(session.reply("what is 2 + 3?"), out=buf)
    assert buf.getvalue() == "[calculator: 2+3] → 5\n"
    sid = tok.convert_tokens_to_ids
    assert session.tokens[-5:] == [sid("<|python_end|>"), sid("<|output_start|>"), *encode_ordinary(tok, "5"),
                                   sid("<|output_end|>"), sid("<|assistant_end|>")]


def test_default_model_is_the_newest_run(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="--model"):
        resolve_model(None, tmp_path / "runs")
    model = perturbed_model(tiny_config(depth=1))
    old, new = tmp_path / "runs" / "old", tmp_path / "runs" / "new"
    for step in (10, 200, 30):  # highest step wins, not the last written
        model.save_pretrained(new / f"checkpoint-{step}")
    model.save_pretrained(old)
    os.utime(old / "config.json", (time.time() - 3600, time.time() - 3600))
    (new / ".tmp-checkpoint-300").mkdir()  # half-written: ignored
    assert newest_model(tmp_path / "runs") == str(new / "checkpoint-200")
    model.save_pretrained(new)  # the final model of the run beats its checkpoints
    assert resolve_model(None, tmp_path / "runs") == str(new)
    with pytest.raises(FileNotFoundError, match="its newest model is .*new"):
        resolve_model(str(tmp_path / "runs"))  # a folder of runs is not a model, but the error points at one
