"""CORE: golden parity with nanochat's own evaluator, batched == one-by-one, the arithmetic, bundle errors, the
`evaluate` module, the CLI on 1 and 2 processes, and a GPT-2 (learned positions, so prompts get cut)."""

import hashlib
import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, REPO, clean_env, shared_path
from evaluation.core import evaluate_core, format_table
from evaluation.core_bundle import BundleError, load_bundle, load_rows
from evaluation.core_prompts import ScoredSequence, bos_token_id, common_length, fewshot_indices
from evaluation.core_score import centered_accuracy, core_summary
from evaluation.core_scoring import crop_left, plan_batches, position_limit
from modeling_nanochat import NanoChatForCausalLM
from modeling_nanochat.checkpoints.convert import convert, load_nanochat_checkpoint
from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer

GOLDEN = FIXTURES / "nanochat_core"


@pytest.fixture(scope="module")
def bundle():
    return shared_path("core_sample")


@pytest.fixture(scope="module")
def tokenizer():
    return convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))


@pytest.fixture(scope="module")
def model():
    """The tiny perturbed nanochat model of tests/fixtures/nanochat_current: arbitrary but deterministic answers."""
    state, config, _, _ = load_nanochat_checkpoint(FIXTURES / "nanochat_current")
    m = NanoChatForCausalLM(config)
    m.load_state_dict(state)
    return m.eval()


def _tokens_sha256(record):
    seqs = record["sequences"]
    return hashlib.sha256(json.dumps([[s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs]]).encode()) \
        .hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# 1. golden parity with nanochat's own core_eval + base_eval (outputs in tests/fixtures/nanochat_core)


@pytest.mark.parametrize("name", ["golden_all", "golden_max16"])
def test_matches_nanochat_item_by_item(name, model, tokenizer, bundle):
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    out = evaluate_core(model, tokenizer, bundle, max_per_task=golden["max_per_task"], return_items=True,
                        progress=False)
    assert list(out["results"]) == list(golden["results"])  # core.yaml order
    for task, records in golden["items"].items():
        ours = out["items"][task]
        assert len(ours) == len(records)
        for g in records:
            o = ours[g["idx"]]
            where = f"{task}[{g['idx']}]"
            assert _tokens_sha256(o) == g["tokens_sha256"], f"{where}: prompt tokens or scored spans differ"
            assert o["correct"] == g["correct"], where
            if "mean_losses" in g:
                assert o["mean_losses"] == pytest.approx(g["mean_losses"], abs=1e-4), where
            else:
                assert (o["argmax"], o["target"]) == (g["predicted"], g["target"]), where
        assert out["results"][task]["accuracy"] == pytest.approx(golden["results"][task]["accuracy"], abs=1e-6)
        assert out["results"][task]["centered"] == pytest.approx(golden["results"][task]["centered"], abs=1e-6)
    assert out["core"] == pytest.approx(golden["core"], abs=1e-6)
    assert sum(out["cropped"].values()) == 0  # rotary model: no position limit, nothing cut (as in nanochat)
    # the fixture is not degenerate: both outcomes occur on the option tasks
    flags = [r["correct"] for t in ("arc_easy", "copa", "winograd") for r in golden["items"][t]]
    assert any(flags) and not all(flags)


def test_subsample_and_fewshot_picks():
    # nanochat's seeds: Random(1234 + idx).sample of the other indices; never the item itself
    picks = fewshot_indices(3, 40, 10)
    assert len(set(picks)) == 10 and 3 not in picks and picks == fewshot_indices(3, 40, 10)
    assert picks != fewshot_indices(4, 40, 10) and fewshot_indices(0, 5, 0) == []
    assert common_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_length([[9, 1, 2], [8, 1, 2]], from_end=True) == 2


# ----------------------------------------------------------------------------------------------------------------
# 2. batched == one by one; arithmetic; bundle errors


def test_batched_scoring_equals_one_by_one(model, tokenizer, bundle):
    # one task of each type (10-shot where it has shots), on nanochat's 11-row subsample
    kw = dict(max_per_task=11, tasks=["arc_easy", "winograd", "bigbench_operators"], return_items=True, progress=False)
    one = evaluate_core(model, tokenizer, bundle, batch_size=1, **kw)
    many = evaluate_core(model, tokenizer, bundle, batch_size=64, max_batch_tokens=100_000, **kw)
    tight = evaluate_core(model, tokenizer, bundle, batch_size=64, max_batch_tokens=3000, **kw)  # other batch shapes
    for other in (many, tight):
        assert other["results"] == one["results"]
        for task, records in one["items"].items():
            for a, b in zip(records, other["items"][task]):
                assert (a["correct"], a["sequences"], a.get("argmax")) == \
                    (b["correct"], b["sequences"], b.get("argmax"))
                if "mean_losses" in a:
                    assert b["mean_losses"] == pytest.approx(a["mean_losses"], abs=1e-4)
    assert plan_batches([5, 9, 7, 3], batch_size=2, max_batch_tokens=100) == [[1, 2], [0, 3]]
    assert plan_batches([5, 9, 7, 3], batch_size=8, max_batch_tokens=15) == [[1], [2, 0], [3]]


class _Peeking(torch.nn.Module):
    """Scores as if it knew the next token (it reads it from the input): every continuation is reproduced, so
    language_modeling is always right; `wrong_last` makes it miss the last token of every row instead."""

    def __init__(self, vocab, wrong_last=False, bos=None):
        super().__init__()
        self.vocab, self.wrong_last, self.bos = vocab, wrong_last, bos
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, use_cache=None):
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong_last:
            if attention_mask is None:  # right-padded with BOS, which no continuation contains after position 0
                real = input_ids != self.bos
                real[:, 0] = True
                attention_mask = real.long().cumprod(1)
            last = attention_mask.sum(1) - 2  # the position that predicts each row's last real token
            nxt[torch.arange(len(nxt)), last] = (nxt[torch.arange(len(nxt)), last] + 1) % self.vocab
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float() * 10
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})()


class _PeekingAllLogits(_Peeking):
    """Without logits_to_keep: the scorer slices the full logits itself."""

    def forward(self, input_ids, attention_mask=None):
        return super().forward(input_ids, attention_mask)


@pytest.mark.parametrize("cls", [_Peeking, _PeekingAllLogits])
def test_language_modeling_needs_every_token(cls, tokenizer, bundle):
    kw = dict(max_per_task=12, tasks=["jeopardy", "lambada_openai", "bigbench_operators"], progress=False)
    right = evaluate_core(cls(len(tokenizer)), tokenizer, bundle, **kw)
    assert all(r["accuracy"] == 1.0 and r["centered"] == 1.0 for r in right["results"].values())
    assert right["core"] == 1.0
    bos = tokenizer.convert_tokens_to_ids("<|bos|>")
    wrong = evaluate_core(cls(len(tokenizer), wrong_last=True, bos=bos), tokenizer, bundle, **kw)
    assert all(r["accuracy"] == 0.0 for r in wrong["results"].values())


def test_centered_and_core_arithmetic():
    out = core_summary({"a": [1, 0, 0, 1], "b": [True, True, True, False, False], "c": [0, 0, 1], "d": [1] * 5},
                       {"a": 50, "b": 25, "c": 0, "d": 9.1})
    # by hand: a 0.5 at chance -> 0; b (0.6 - 0.25) / 0.75; c 1/3 (no chance level); d perfect -> 1
    want = {"a": (0.5, 0.0), "b": (0.6, 0.35 / 0.75), "c": (1 / 3, 1 / 3), "d": (1.0, 1.0)}
    for task, (acc, centered) in want.items():
        assert out["results"][task] == pytest.approx({"accuracy": acc, "centered": centered}, abs=1e-12)
    assert out["core"] == pytest.approx((0 + 0.35 / 0.75 + 1 / 3 + 1) / 4, abs=1e-12)
    assert centered_accuracy(0.0, 20) == pytest.approx(-0.25)  # below chance goes negative
    with pytest.raises(ValueError, match="percentage"):
        centered_accuracy(0.5, 100)
    with pytest.raises(ValueError, match="no random baseline"):
        core_summary({"x": [1]}, {})


def _corrupt(tmp_path, bundle, edit):
    root = tmp_path / "bundle"
    shutil.copytree(bundle, root)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)  # ../shared is read-only
    edit(root)
    return root


def _replace_line(path, lineno, text):
    lines = path.read_text().splitlines(keepends=True)
    lines[lineno - 1] = text + "\n"
    path.write_text("".join(lines))


COPA = "eval_data/commonsense_reasoning/copa.jsonl"
CORRUPTIONS = {
    "missing data file": (lambda r: (r / COPA).unlink(),
                          r"core\.yaml:15: task 'copa': data file .*copa\.jsonl is missing"),
    "bad json row": (lambda r: _replace_line(r / COPA, 5, '{"query": "x", "gold": 0, "choices": ["a", "b"'),
                     r"copa\.jsonl:5: not valid JSON"),
    "row lacks a field": (lambda r: _replace_line(r / COPA, 7, '{"query": "x", "gold": 0}'),
                          r"copa\.jsonl:7: .* missing \['choices'\]"),
    "gold out of range": (lambda r: _replace_line(r / COPA, 2, '{"query": "x", "gold": 2, "choices": ["a", "b"]}'),
                          r"copa\.jsonl:2: 'gold' must be an index"),
    "unknown task type": (lambda r: (r / "core.yaml").write_text((r / "core.yaml").read_text().replace(
        "icl_task_type: schema", "icl_task_type: ranking")),
        r"core\.yaml:27: task 'winograd' has unknown icl_task_type 'ranking'"),
    "bad yaml": (lambda r: _replace_line(r / "core.yaml", 4, "  num_fewshot: [10"), r"core\.yaml:\d+: not valid YAML"),
    "missing core.yaml": (lambda r: (r / "core.yaml").unlink(), r"core\.yaml is missing"),
    "no baseline row": (lambda r: _replace_line(r / "eval_meta_data.csv", 4, "other,x,y,0,1,50,,"),
                        r"eval_meta_data\.csv: no row for task 'copa' \(named at .*core\.yaml:15\)"),
    "bad baseline": (lambda r: _replace_line(r / "eval_meta_data.csv", 4, "copa,x,y,0,1,fifty,,"),
                     r"eval_meta_data\.csv:4: Random baseline 'fifty' of 'copa' is not a number"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_bundle_names_file_and_line(case, tmp_path, bundle):
    edit, message = CORRUPTIONS[case]
    root = _corrupt(tmp_path, bundle, edit)
    with pytest.raises(BundleError, match=message):
        for task in load_bundle(root):
            load_rows(task)


def test_too_few_rows_for_the_shots(bundle):
    task = load_bundle(bundle, ["jeopardy"])[0]
    with pytest.raises(BundleError, match="needs at least 11 for 10-shot"):
        load_rows(task, max_per_task=10)
    with pytest.raises(BundleError, match="unknown task"):
        load_bundle(bundle, ["nope"])


# ----------------------------------------------------------------------------------------------------------------
# 3. the `evaluate` module, offline


def test_evaluate_module_offline(model, tokenizer, bundle, tmp_path):
    out = evaluate_core(model, tokenizer, bundle, max_per_task=12, return_items=True, progress=False)
    payload = {"correct": [r["correct"] for t in out["items"] for r in out["items"][t]],
               "task": [t for t in out["items"] for _ in out["items"][t]],
               "random_baselines": {t.label: t.random_baseline for t in load_bundle(bundle)}}
    (tmp_path / "in.json").write_text(json.dumps(payload))
    script = ("import json, sys, evaluate\n"
              "m = evaluate.load('evaluation/metrics/core', keep_in_memory=True)\n"
              "print(json.dumps(m.compute(**json.load(open(sys.argv[1])))))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.json")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=clean_env(HF_HOME=str(tmp_path / "hf"), HF_EVALUATE_OFFLINE="1",
                                                                HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"results": out["results"], "core": out["core"]}


# ----------------------------------------------------------------------------------------------------------------
# CLI: our checkpoint with and without remote code, 1 and 2 processes; GPT-2 with a position limit


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_one_and_two_processes(tmp_path, model, tokenizer, bundle):
    ckpt = tmp_path / "ckpt"
    convert(str(FIXTURES / "nanochat_current"), str(ckpt), tokenizer_dir=str(FIXTURES / "nanochat_tokenizer"))
    args = ["--model", str(ckpt), "--bundle", str(bundle), "--max-per-task", "12", "--tasks",
            "jeopardy,copa,winograd", "--no-progress"]
    env = clean_env(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"))
    one = subprocess.run([sys.executable, "-m", "evaluation.core", *args, "--trust-remote-code",
                          "--output", str(tmp_path / "one.json")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "evaluation.core", *args, "--output", str(tmp_path / "two.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stderr and "1 process(es)" in one.stderr  # a silent single process cannot pass
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a == b
    want = evaluate_core(model, tokenizer, bundle, max_per_task=12, tasks=["jeopardy", "copa", "winograd"],
                         progress=False)
    assert a == want
    assert format_table(want) in one.stdout and "| **CORE** |" in one.stdout


def test_gpt2_with_position_limit(tmp_path, tokenizer, bundle):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    gpt2 = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    assert position_limit(gpt2) == 128
    kw = dict(max_per_task=11, tasks=["jeopardy", "copa"], progress=False, return_items=True, share_prefix=False)
    out = evaluate_core(gpt2, tokenizer, bundle, **kw)  # wpe has 128 rows: an uncut 10-shot prompt would crash
    assert out["cropped"]["jeopardy"] == 11 and out["cropped"]["copa"] == 0
    assert all(len(s[0]) <= 128 for r in out["items"]["jeopardy"] for s in r["sequences"])
    assert out == evaluate_core(gpt2, tokenizer, bundle, batch_size=1, **kw)
    # nanochat's rule: keep the last tokens, shift the span; a continuation that cannot fit is an error
    assert crop_left(ScoredSequence(list(range(10)), 7, 10), 5) == (ScoredSequence([5, 6, 7, 8, 9], 2, 5), True)
    assert crop_left(ScoredSequence(list(range(10)), 7, 10), None)[1] is False
    with pytest.raises(ValueError, match="does not fit"):
        crop_left(ScoredSequence(list(range(10)), 3, 10), 5)


def test_bos_fallbacks(tokenizer):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    assert bos_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|bos|>")
    gpt2_like = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<|endoftext|>": 0, "a": 1}, "a")))
    assert bos_token_id(gpt2_like) == 0
    none = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0}, "a")))
    with pytest.raises(ValueError, match="BOS"):
        bos_token_id(none)


def test_bundle_download(tmp_path, bundle, monkeypatch):
    import http.server
    import threading
    import zipfile

    from evaluation.core_bundle import download_bundle, ensure_bundle

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "eval_bundle.zip", "w") as z:  # nanochat's zip holds an eval_bundle/ folder
        for p in sorted(bundle.rglob("*")):
            if p.is_file():
                z.write(p, "eval_bundle/" + str(p.relative_to(bundle)))
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        dest = download_bundle(tmp_path / "cache" / "eval_bundle", url=f"{url}/eval_bundle.zip")
        assert [t.label for t in load_bundle(dest)] == [t.label for t in load_bundle(bundle)]
        with pytest.raises(BundleError, match="could not fetch .* pass --bundle DIR"):
            download_bundle(tmp_path / "other", url=f"{url}/missing.zip")
    finally:
        server.shutdown()
    assert not (tmp_path / "other").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: fail at once, saying what to do
    with pytest.raises(BundleError, match="HF_HUB_OFFLINE is set.*--bundle DIR"):
        ensure_bundle(tmp_path / "absent")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    with pytest.raises(BundleError, match=str(tmp_path / "base" / "eval_bundle")):
        ensure_bundle()
