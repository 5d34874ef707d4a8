"""Ordinary mistakes in a user's data, met through the real commands (subprocesses): empty or whitespace-only corpora,
a parquet shard without its text column, lines that are not JSON or not UTF-8, conversations that break the chat
protocol, GSM8K rows without their answer, a broken CORE bundle, a tokenizer trained on nothing. Each ends in one
`error:` line naming the file (and line) and the fix, exit status 2, no traceback, and nothing written."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from app_helpers import tiny_checkpoint
from conftest import shared_path
from fault_helpers import pretrain_args, pretrain_assets, run, user_error

PREPARE = "recipes/prepare_chat_data.py"
SFT_ONLY_JSONL = ["--smoltalk-epochs", "0", "--mmlu-epochs", "0", "--gsm8k-epochs", "0", "--no-val"]
GOOD_TURN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Shared, built once: the fixture tokenizer (+ tiny parquet shards) for pretraining, and a `datasets` cache of
    our own, so that nothing lands in (or is read from) the user's."""
    root = tmp_path_factory.mktemp("data_faults")
    pretrain_assets(root)
    return root


@pytest.fixture(scope="module")
def model(work):
    return tiny_checkpoint(work / "model")[2]


def _run(work, *args):
    return run(*args, extra_env={"HF_DATASETS_CACHE": work / "hf_datasets"})


def _pretrain(work, tmp_path, data):
    out = tmp_path / "run"
    res = _run(work, *pretrain_args(work, out, "--num-iterations", "2", "--data", data))
    assert not (out / "run_config.json").exists()  # stopped before any training
    return res


def _prepare_sft(work, tmp_path, conversations: list) -> tuple:
    """`prepare_chat_data.py sft` on one JSONL file of conversations (a list of JSON values, or raw lines)."""
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join((c if isinstance(c, str) else json.dumps(c)) + "\n" for c in conversations))
    out = tmp_path / "out"
    res = _run(work, PREPARE, "sft", "--output-dir", out, *SFT_ONLY_JSONL, "--extra-jsonl", path)
    assert not out.exists()
    return res, path


# ----------------------------------------------------------------------------------------------------------------
# pretraining corpora


def _write_empty(path):
    if path.suffix == ".parquet":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(b"")


@pytest.mark.fault("Data", "pretraining on an empty corpus (.txt / .jsonl / .parquet)")
@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_pretrain_on_an_empty_corpus(work, tmp_path, told, suffix):
    corpus = tmp_path / f"corpus{suffix}"
    _write_empty(corpus)
    told(user_error(_pretrain(work, tmp_path, corpus), str(corpus), "empty", "fix:"))


@pytest.mark.fault("Data", "pretraining on a whitespace-only corpus")
def test_pretrain_on_a_whitespace_only_corpus(work, tmp_path, told):
    corpus = tmp_path / "blank.txt"
    corpus.write_text("   \n\n\t\n\n  \n")
    told(user_error(_pretrain(work, tmp_path, corpus), str(corpus), "empty", "whitespace",
                    "fix: point --data at a corpus with text"))


@pytest.mark.fault("Data", "parquet shard without a 'text' column")
def test_parquet_shard_without_text_column(work, tmp_path, told):
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"text": ["a document"] * 4}), shards / "shard_00000.parquet")
    pq.write_table(pa.table({"content": ["a document"] * 4}), shards / "shard_00001.parquet")
    told(user_error(_pretrain(work, tmp_path, shards), str(shards / "shard_00001.parquet"), "no 'text' column",
                    "['content']", "fix: rename yours to 'text'"))


@pytest.mark.fault("Data", "non-UTF-8 bytes in a corpus file")
def test_corpus_that_is_not_utf8(work, tmp_path, told):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("first paragraph\n\nsecond\n".encode() + "un caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    told(user_error(_pretrain(work, tmp_path, corpus), f"{corpus}:4", "not UTF-8", "byte 0xe9", "fix:", "UTF-8"))


@pytest.mark.fault("Data", "tokenizer training on an empty corpus")
def test_tokenizer_on_an_empty_corpus(work, tmp_path, told):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("\n\n  \n")
    out = tmp_path / "tok"
    res = _run(work, "recipes/tokenizer.py", "--data", corpus, "--vocab-size", "300", "--output-dir", out)
    told(user_error(res, str(corpus), "empty", "nothing to train the tokenizer on", "fix: point --data at text"))
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# evaluation and RL data


@pytest.mark.fault("Data", "a .jsonl line that is not JSON -> evaluation.chat --data")
def test_chat_eval_jsonl_line_that_is_not_json(work, model, tmp_path, told):
    data = tmp_path / "gsm8k.jsonl"
    good = json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"})
    data.write_text(f"{good}\n\n{good[:-5]}\n{good}\n")  # line 3 is cut short
    out = tmp_path / "results.json"
    res = _run(work, "-m", "evaluation.chat", "--model", model, "--task", "gsm8k", "--data", data, "--limit", "1",
               "--no-progress", "--output", out)
    message = told(user_error(res, f"{data}:3", "not valid JSON", "fix: ", "repair or delete that line"))
    assert message.startswith(f"error: {data}:3"), message  # ours is the first word, no `datasets` log before it
    assert not out.exists()


@pytest.mark.fault("Data", "GSM8K rows without '#### N' -> RL prompts (prepare_chat_data grpo)")
def test_gsm8k_rows_without_final_answer(work, tmp_path, told):
    data = tmp_path / "gsm8k_train.jsonl"
    rows = [{"question": "What is 1 + 1?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"},
            {"question": "What is 2 + 2?", "answer": "2 + 2 = <<2+2=4>>4, so the answer is 4."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "grpo"
    res = _run(work, PREPARE, "grpo", "--output-dir", out, "--gsm8k", data, "--no-test")
    told(user_error(res, f"{data}:2", "no final '#### <number>' line", "fix: end every answer with '#### N'"))
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# SFT conversations (recipes/prepare_chat_data.py sft reads them as recipes/sft.py does: modeling_nanochat.sft.data)


@pytest.mark.fault("Data", "SFT conversation with wrong roles (assistant first, system mid-way, 'bot')")
@pytest.mark.parametrize("messages, complaint", [
    ([{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}], "message 0 has role 'assistant'"),
    ([*GOOD_TURN, {"role": "system", "content": "be brief"}, *GOOD_TURN],
     "message 2 has role 'system'"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}], "'bot' is not a role"),
], ids=["assistant-first", "system-mid-way", "role-bot"])
def test_sft_conversation_with_wrong_roles(work, tmp_path, told, messages, complaint):
    res, path = _prepare_sft(work, tmp_path, [GOOD_TURN, messages])
    told(user_error(res, f"{path}:2", complaint, "fix: order the messages user, assistant"))


@pytest.mark.fault("Data", "SFT conversation with an empty assistant turn")
def test_sft_conversation_with_empty_assistant_turn(work, tmp_path, told):
    empty = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": " "}]}]
    res, path = _prepare_sft(work, tmp_path, [GOOD_TURN, GOOD_TURN, {"messages": empty}])
    told(user_error(res, f"{path}:3", "assistant message 1 is empty", "fix: write the assistant's reply"))


@pytest.mark.fault("Data", "SFT conversation with tool parts out of order")
def test_sft_conversation_with_tool_parts_out_of_order(work, tmp_path, told):
    parts = [{"type": "text", "text": "Let me compute."}, {"type": "python_output", "text": "4"},
             {"type": "python", "text": "2 + 2"}, {"type": "text", "text": "It is 4."}]
    res, path = _prepare_sft(work, tmp_path, [[{"role": "user", "content": "2 + 2?"},
                                                {"role": "assistant", "content": parts}]])
    told(user_error(res, f"{path}:1", "part 1", "'python_output' part must come right after the 'python' call",
                    "fix: order the parts"))


# ----------------------------------------------------------------------------------------------------------------
# the CORE bundle


@pytest.fixture
def bundle(tmp_path):
    """A copy of ../shared/data/core_sample to break."""
    return shutil.copytree(shared_path("core_sample"), tmp_path / "bundle")


def _core(work, model, bundle, tmp_path):
    out = tmp_path / "core.json"
    res = _run(work, "-m", "evaluation.core", "--model", model, "--bundle", bundle, "--max-per-task", "2",
               "--no-progress", "--output", out)
    assert not out.exists()
    return res


def _yaml_line(bundle, text: str) -> int:
    return next(i for i, line in enumerate((bundle / "core.yaml").read_text().splitlines(), 1) if text in line)


@pytest.mark.fault("Data", "CORE bundle with an unknown task type")
def test_core_bundle_with_unknown_task_type(work, model, bundle, tmp_path, told):
    yaml_path = bundle / "core.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("icl_task_type: schema", "icl_task_type: ranking", 1))
    entry = _yaml_line(bundle, "label: winograd")  # the task's entry starts at its first key
    told(user_error(_core(work, model, bundle, tmp_path), f"{yaml_path}:{entry}", "task 'winograd'",
                    "unknown icl_task_type 'ranking'", "fix: set it to one of", "multiple_choice"))


@pytest.mark.fault("Data", "CORE bundle with a missing data file")
def test_core_bundle_with_missing_data_file(work, model, bundle, tmp_path, told):
    data = bundle / "eval_data" / "commonsense_reasoning" / "copa.jsonl"
    data.unlink()
    entry = _yaml_line(bundle, "label: copa")
    told(user_error(_core(work, model, bundle, tmp_path), f"core.yaml:{entry}", "task 'copa'",
                    f"data file {data} is missing", "fix: restore it", "remove the task from core.yaml"))
