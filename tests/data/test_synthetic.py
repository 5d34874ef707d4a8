"""The synthetic world of the offline speedrun: deterministic, large enough, held out, and in the real formats (the
real loaders of every stage read it)."""

import hashlib
import json
import random
import re

import pytest

from modeling_nanochat.data import synthetic


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "data"
    synthetic.generate(out, docs=400, docs_per_shard=200, chats=300, tool_chats=50, mc_train=100, arith_train=100,
                       grpo_items=50)
    return out


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_bytes_other_seed_other_data(data, tmp_path):
    kw = dict(docs=400, docs_per_shard=200, chats=300, tool_chats=50, mc_train=100, arith_train=100, grpo_items=50)
    synthetic.generate(tmp_path / "again", **kw)
    assert _digest(tmp_path / "again") == _digest(data)
    synthetic.generate(tmp_path / "seed1", seed=1, **kw)
    assert _rows(tmp_path / "seed1" / "chat_eval" / "gsm8k.jsonl") != _rows(data / "chat_eval" / "gsm8k.jsonl")


def test_existing_dir_kept_when_same_refused_when_different(data):
    before = _digest(data)
    synthetic.generate(data, docs=400, docs_per_shard=200, chats=300, tool_chats=50, mc_train=100,
                       arith_train=100, grpo_items=50)  # same settings: nothing rewritten
    assert _digest(data) == before
    with pytest.raises(FileExistsError, match="other settings"):
        synthetic.generate(data, docs=500)
    assert _digest(data) == before


def test_eval_tasks_have_200_items_held_out_from_training(data):
    chat = _rows(data / "chat_eval" / "synth_chat.jsonl")
    arith = _rows(data / "chat_eval" / "gsm8k.jsonl")
    mc = _rows(data / "chat_eval" / "mmlu.jsonl")
    assert len(chat) == len(arith) == len(mc) == 200
    assert len({r["question"] for r in chat}) == 200 and len({r["question"] for r in arith}) == 200
    trained = {m["content"] for f in ("smoltalk/train.jsonl", "smoltalk/test.jsonl")
               for conv in _rows(data / "sft" / f) for m in conv["messages"] if m["role"] == "user"}
    assert trained and not trained & {r["question"] for r in chat}
    train_arith = {r["question"] for f in ("sft/gsm8k/train.jsonl", "grpo/train.jsonl") for r in _rows(data / f)}
    assert not train_arith & {r["question"] for r in arith}
    train_mc = {(r["question"], tuple(r["choices"])) for r in _rows(data / "sft/mmlu/auxiliary_train.jsonl")}
    assert not train_mc & {(r["question"], tuple(r["choices"])) for r in mc}
    for name, *_ in synthetic.CORE_TASKS:
        assert len(_rows(data / "core" / "eval_data" / "synthetic" / f"{name}.jsonl")) == 300


def test_word_problems_are_right():
    from modeling_nanochat.generation.calculator import use_calculator

    rng = random.Random(5)
    kinds = set()
    for _ in range(300):
        p = synthetic.word_problem(rng)
        kinds.add(p["kind"])
        for expr, result in (c.split("=") for c in re.findall(r"<<([^>]+)>>", p["answer"])):
            assert use_calculator(expr) == int(result)  # the calculator gives what the reference says
        assert p["answer"].endswith(f"#### {p['result']}") and p["result"] >= 0
    assert kinds == {"add", "sub", "mul", "add_sub", "mul_add", "mul_add_sub"}


def test_stages_read_it_with_their_real_loaders(data):
    from evaluation.chat import load_tasks
    from evaluation.core_bundle import load_bundle
    from modeling_nanochat.data.loader import resolve_data
    from modeling_nanochat.sft.data import build_sft_mixture
    from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer
    from tests.conftest import FIXTURES

    source = resolve_data(str(data / "pretrain"))
    assert len(source.shards("train")) == 1 and len(source.shards("val")) == 1
    tok = convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))
    mix = build_sft_mixture(tok, "train", data_dir=data / "sft", mmlu_epochs=1, gsm8k_epochs=1,
                            extra_jsonl=[f"{data / 'sft' / 'tools.jsonl'}:2"])
    assert len(mix) == 300 + 2 * 50 + 100 + 100
    ids, mask = mix[0]
    assert len(ids) == len(mask) and any(mask)
    tasks = load_tasks(["synth_chat", "mmlu", "gsm8k"], str(data / "chat_eval"))
    assert {n: len(t) for n, t in tasks.items()} == {"synth_chat": 200, "mmlu": 200, "gsm8k": 200}
    specs = load_bundle(data / "core")
    assert [s.label for s in specs] == [name for name, *_ in synthetic.CORE_TASKS]


def test_synth_chat_grades_the_first_sentence_only():
    from evaluation.tasks.synthetic import SynthChat

    task = SynthChat.__new__(SynthChat)  # grading needs no rows
    conv = task.conversation({"question": "What does the cow say?", "answer": "The cow says moo.", "keyword": "moo"})
    assert task.evaluate(conv, "The cow says moo.")
    assert task.evaluate(conv, "Moo! That is what it says.")
    assert not task.evaluate(conv, "The cow says woof. The duck says quack. The cow says moo.")
    assert not task.evaluate(conv, "The cow says mooing.")
    with pytest.raises(ValueError, match="synth_chat.jsonl"):
        SynthChat()
