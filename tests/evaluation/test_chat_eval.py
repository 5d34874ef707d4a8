"""ChatCORE against nanochat's own chat-eval code (golden outputs in tests/fixtures/nanochat_chat_eval, made by
running nanochat's tasks/*.py and scripts/chat_eval.py on the sample files there; see tests/fixtures/README.md):
task rendering, HumanEval program assembly, and whole evaluation loops on a nanochat checkpoint converted to ours.
Then the CLI end to end on a tiny random model, on one and on two processes."""

import json
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import FIXTURES, REPO, clean_env, perturbed_model, shared_path, tiny_config

from evaluation.chat import CATEGORICAL, LetterIds, chatcore, evaluate_task, format_table, load_tasks, predict_letters
from evaluation.tasks import TASKS
from evaluation.tasks.humaneval import completion_code, prompt_imports
from modeling_nanochat.tokenizer.chat_format import render_for_completion
from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer

DATA = FIXTURES / "nanochat_chat_eval" / "data"
GOLDEN = json.loads((FIXTURES / "nanochat_chat_eval" / "golden.json").read_text())
TOKENIZERS = {"512": "nanochat_tokenizer", "4k": "nanochat_tokenizer_4k"}


def task_data(name):
    return shared_path("gsm8k", "train_sample.jsonl") if name == "gsm8k" else DATA


@pytest.fixture(scope="module")
def tokenizers():
    return {k: convert_nanochat_tokenizer(str(FIXTURES / d)) for k, d in TOKENIZERS.items()}


@pytest.fixture(scope="module")
def tasks():
    return {name: TASKS[name](task_data(name)) for name in TASKS}


@pytest.mark.parametrize("name", list(TASKS))
def test_rendering_matches_nanochat(name, tasks, tokenizers):
    task, golden = tasks[name], GOLDEN["tasks"][name]
    assert len(golden) >= 3
    for item in golden:
        conv = task[item["index"]]  # same index = same row: our shuffle is nanochat's
        assert json.loads(json.dumps(conv["messages"])) == item["messages"]
        for key, tok in tokenizers.items():
            assert render_for_completion(tok, conv) == item["prompt_ids"][key], (name, item["index"], key)
        if task.eval_type == "categorical":
            assert list(conv["letters"]) == item["letters"]
            for key, tok in tokenizers.items():
                assert [[i] for i in LetterIds(tok)(conv["letters"])] == item["letter_ids"][key]
            assert [task.evaluate(conv, letter) for letter in conv["letters"]] == item["outcomes"]
    if name.startswith("arc"):  # the samples include ARC's numeric labels and 3/5-choice questions
        letters = {tuple(i["letters"]) for i in GOLDEN["tasks"]["arc_easy"] + GOLDEN["tasks"]["arc_challenge"]}
        assert ("1", "2", "3", "4") in letters and ("A", "B", "C") in letters and ("A", "B", "C", "D", "E") in letters


def test_humaneval_programs_match_nanochat(tasks):
    task = tasks["humaneval"]
    for item in GOLDEN["tasks"]["humaneval"]:
        conv = task[item["index"]]
        assert prompt_imports(conv["messages"][0]["content"]) == item["imports"]
        outcomes = []
        for case in item["completions"]:
            assert completion_code(case["completion"]) == case["program"]
            outcomes.append(task.evaluate(conv, case["completion"]))
        assert outcomes == [c["passed"] for c in item["completions"]]
        assert outcomes[0] and not outcomes[-1]  # the canonical solution passes, a stray block does not


@pytest.fixture(scope="module")
def nanochat_checkpoint(tmp_path_factory):
    """The perturbed nanochat checkpoint of tests/fixtures/nanochat_current, converted to our format."""
    from modeling_nanochat import NanoChatForCausalLM
    from modeling_nanochat.checkpoints.convert import convert
    from modeling_nanochat.tokenizer.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("ckpt") / "model"
    convert(str(FIXTURES / "nanochat_current"), str(out), tokenizer_dir=str(FIXTURES / "nanochat_tokenizer"))
    return NanoChatForCausalLM.from_pretrained(str(out)).eval(), load_tokenizer(str(out))


@pytest.mark.parametrize("run", list(GOLDEN["nanochat_runs"]))
def test_eval_loops_match_nanochat(run, nanochat_checkpoint):
    """nanochat's run_categorical_eval / run_generative_eval (with its Engine) on the same weights: the same
    predicted letter or the same completions for every problem, hence the same accuracy."""
    model, tok = nanochat_checkpoint
    golden = GOLDEN["nanochat_runs"][run]
    name = golden.get("task", run)
    task = TASKS[name](task_data(name))
    if task.eval_type == "categorical":
        out = evaluate_task(task, model, tok, batch_size=golden["batch_size"], progress=False)
        ours = [r["prediction"] for r in out["records"]]
    else:
        out = evaluate_task(task, model, tok, limit=golden["limit"], num_samples=golden["num_samples"],
                            max_new_tokens=golden["max_new_tokens"], temperature=golden["temperature"],
                            top_k=golden["top_k"], progress=False)
        ours = [c for r in out["records"] for c in r["completions"]]
    assert ours == [r["response"] for r in golden["records"]]
    k = golden.get("num_samples", 1)  # pass@k: a problem passes if any of its k samples does
    theirs = [any(r["correct"] for r in golden["records"][i:i + k]) for i in range(0, len(golden["records"]), k)]
    assert [r["correct"] for r in out["records"]] == theirs
    assert out["accuracy"] == pytest.approx(golden["accuracy"])


def test_batched_equals_one_by_one(tasks, tokenizers):
    model = perturbed_model(tiny_config())
    tok = tokenizers["512"]
    conversations = [tasks[n][i] for n in CATEGORICAL for i in range(len(tasks[n]))]
    batched = predict_letters(model, tok, conversations)
    assert batched == [predict_letters(model, tok, [c])[0] for c in conversations]
    assert len(set(batched)) > 1  # the model is not constant


def test_chatcore_arithmetic():
    acc = {"arc_easy": 0.5, "arc_challenge": 0.25, "mmlu": 1.0, "gsm8k": 0.1, "humaneval": 0.0}
    base = {n: TASKS[n].baseline for n in acc}
    assert base == {"arc_easy": 0.25, "arc_challenge": 0.25, "mmlu": 0.25, "gsm8k": 0.0, "humaneval": 0.0}
    results = {n: {"centered": (a - base[n]) / (1 - base[n])} for n, a in acc.items()}
    assert chatcore(results) == pytest.approx((1 / 3 + 0 + 1 + 0.1 + 0) / 5)
    assert chatcore(results, CATEGORICAL) == pytest.approx((1 / 3 + 0 + 1) / 3)
    del results["humaneval"]
    assert chatcore(results) is None  # as nanochat: only when all five tasks ran


def test_local_data_layouts_and_errors(tmp_path):
    from datasets import load_dataset

    rows = load_dataset("json", data_files=str(DATA / "arc_easy.jsonl"), split="train")
    hub = tmp_path / "hub" / "ARC-Easy"  # a download of allenai/ai2_arc
    hub.mkdir(parents=True)
    rows.to_parquet(str(hub / "test-00000-of-00001.parquet"))
    (hub / "train-00000-of-00001.parquet").write_bytes(b"not read: another split")
    a, b = TASKS["arc_easy"](DATA), TASKS["arc_easy"](tmp_path / "hub")
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    with pytest.raises(FileNotFoundError, match="arc_challenge.jsonl"):
        TASKS["arc_challenge"](tmp_path / "hub")
    with pytest.raises(ValueError, match="one file"):
        load_tasks(["arc_easy", "mmlu"], str(DATA / "arc_easy.jsonl"))
    with pytest.raises(ValueError, match=r"missing columns \['subject', 'answer'\]"):
        TASKS["mmlu"](DATA / "arc_easy.jsonl")
    bad = tmp_path / "arc_easy.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                               "answerKey": "C"}) + "\n")
    with pytest.raises(ValueError, match="answerKey 'C' is not one of"):
        TASKS["arc_easy"](bad)[0]


# ----------------------------------------------------------------------------------------------------------------
# CLI end to end


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    perturbed_model(tiny_config()).save_pretrained(str(d / "model"))
    convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"), str(d / "model"))
    data = d / "data"
    shutil.copytree(DATA, data)
    shutil.copy(shared_path("gsm8k", "train_sample.jsonl"), data / "gsm8k.jsonl")
    return d


def _cli(args, cwd, launcher=()):
    return subprocess.run([*launcher, "-m", "evaluation.chat", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=clean_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_end_to_end_one_and_two_processes(tiny_model_dir):
    d = tiny_model_dir
    args = ["--model", str(d / "model"), "--task", "all", "--data", str(d / "data"), "--limit", "5",
            "--batch-size", "2", "--max-new-tokens", "6", "--num-samples", "2", "--temperature", "1.0",
            "--no-progress"]
    one = _cli([*args, "--output", str(d / "one.json")], d, (sys.executable,))
    assert one.returncode == 0, one.stderr[-3000:]
    assert "| Task | Accuracy | Centered | Passed |" in one.stdout and "ChatCORE" in one.stdout
    out = json.loads((d / "one.json").read_text())
    assert list(out["results"]) == list(TASKS) and out["world_size"] == 1
    for name, r in out["results"].items():
        assert r["total"] == min(5, len(TASKS[name](task_data(name)))) == len(r["records"])
        assert r["accuracy"] == r["passed"] / r["total"]
    assert out["chatcore"] == pytest.approx(sum(r["centered"] for r in out["results"].values()) / 5)
    assert format_table(out).splitlines()[2].startswith("| ARC-Easy |")
    assert out["sandbox"]["python_guard"] is True

    two = _cli([*args, "--output", str(d / "two.json")], d,
               (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port())))
    assert two.returncode == 0, two.stderr[-3000:]
    out2 = json.loads((d / "two.json").read_text())
    assert out2["world_size"] == 2  # really two processes (a silent single-process run would say 1)
    assert out2["results"] == out["results"]  # sharded by rank, gathered: the same records in the same order


@pytest.mark.slow
def test_cli_offline_without_data_fails_fast(tiny_model_dir):
    proc = _cli(["--model", str(tiny_model_dir / "model"), "--task", "gsm8k"], tiny_model_dir, (sys.executable,))
    assert proc.returncode == 2
    assert "HF_HUB_OFFLINE=1" in proc.stderr and "--data" in proc.stderr


@pytest.mark.slow
def test_cli_also_runs_several_sets_in_one_process(tiny_model_dir):
    """--also: each set's output equals what a process of its own writes; flags it leaves out come from the main
    set (--limit here), its output does not."""
    d = tiny_model_dir
    common = ["--model", str(d / "model"), "--no-progress", "--limit", "3"]
    a = ["--task", "mmlu", "--data", str(d / "data"), "--max-new-tokens", "5"]
    b = ["--task", "gsm8k", "--data", str(d / "data" / "gsm8k.jsonl"), "--max-new-tokens", "7"]
    both = _cli([*common, *a, "--output", str(d / "a.json"),
                 "--also", " ".join([*b, "--output", str(d / "b.json")])], d, (sys.executable,))
    assert both.returncode == 0, both.stderr[-3000:]
    alone = _cli([*common, *b, "--output", str(d / "b_alone.json")], d, (sys.executable,))
    assert alone.returncode == 0, alone.stderr[-3000:]
    out_a, out_b = (json.loads((d / f).read_text()) for f in ("a.json", "b.json"))
    assert list(out_a["results"]) == ["mmlu"] and list(out_b["results"]) == ["gsm8k"]
    assert out_b["results"] == json.loads((d / "b_alone.json").read_text())["results"]
    assert out_b["results"]["gsm8k"]["total"] == 3 and out_b["settings"]["max_new_tokens"] == 7


def test_cli_also_refuses_model_flags_and_bad_data_early(tiny_model_dir, capsys):
    from evaluation.chat import _parse

    with pytest.raises(SystemExit) as e:
        _parse(["--model", "m", "--also", "--task gsm8k --dtype float32"])
    assert e.value.code == 2 and "--dtype float32 cannot go in --also" in capsys.readouterr().err
    d = tiny_model_dir
    proc = _cli(["--model", str(d / "model"), "--task", "mmlu", "--data", str(d / "data"),
                 "--also", f"--task gsm8k --data {d / 'nope.jsonl'}"], d, (sys.executable,))
    assert proc.returncode == 2 and "nope.jsonl" in proc.stderr and "Traceback" not in proc.stderr
