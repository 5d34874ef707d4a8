"""Tokenizer: golden parity with nanochat's own tokenizers, our BPE training, saving/loading, recipes and bench."""

import json
import pickle
import runpy
import subprocess
import sys

import numpy as np
import pytest
import regex
import rustbpe  # dev dependency: nanochat's trainer, the reference for compression
import tiktoken  # noqa: F401 - dev dependency: unpickles nanochat's tokenizer.pkl
import torch
from conftest import FIXTURES, REPO, shared_path
from tokenizers import Regex, pre_tokenizers
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from modeling_nanochat.tokenizer.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    compute_token_bytes,
    convert_nanochat_tokenizer,
    encode_ordinary,
    load_token_bytes,
    train_bpe,
)

NANOCHAT_DIRS = ["nanochat_tokenizer", "nanochat_tokenizer_4k"]  # vocab 512 and 4096, trained by nanochat's code


@pytest.fixture(scope="module", params=NANOCHAT_DIRS)
def nanochat(request):
    src = FIXTURES / request.param
    with open(src / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    return src, enc, convert_nanochat_tokenizer(str(src))


def _docs(text, cap=10_000):
    return [text[i:i + cap] for i in range(0, len(text), cap)]


# ---- conversion of nanochat's tokenizer.pkl -------------------------------------------------------------------------

def test_every_token_keeps_its_id(nanochat):
    _, enc, tok = nanochat
    assert len(tok) == enc.n_vocab
    byte_of = {c: b for b, c in bytes_to_unicode().items()}  # byte-level BPE spells byte b as one unicode char
    tokens = tok.convert_ids_to_tokens(list(range(enc.n_vocab - len(SPECIAL_TOKENS))))
    for i, token in enumerate(tokens):
        assert bytes(byte_of[c] for c in token) == enc.decode_single_token_bytes(i), i
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [enc.encode_single_token(s) for s in SPECIAL_TOKENS]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|assistant_end|>", "<|bos|>")


def test_token_bytes_equal_nanochats(nanochat):
    src, enc, tok = nanochat
    ours = compute_token_bytes(tok)
    assert ours.dtype == torch.int32
    assert torch.equal(ours, torch.load(src / "token_bytes.pt"))
    raw = [len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab - len(SPECIAL_TOKENS))]
    assert ours[: len(raw)].tolist() == raw and ours[len(raw):].tolist() == [0] * len(SPECIAL_TOKENS)


def test_strings_encode_to_nanochats_ids(nanochat):
    src, _, tok = nanochat
    cases = json.loads((src / "encodings.json").read_text())["strings"]
    assert any("<|bos|>" in c["text"] for c in cases)  # typed special-token strings are part of the golden set
    for case in cases:
        assert encode_ordinary(tok, case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["text"]
    assert encode_ordinary(tok, [c["text"] for c in cases]) == [c["ids"] for c in cases]  # batch path too


def test_text_sample_encodes_to_nanochats_ids(nanochat):
    src, _, tok = nanochat
    text = shared_path("text_sample.txt").read_text(encoding="utf-8")
    golden = np.load(src / "text_sample_ids.npz")
    assert encode_ordinary(tok, text) == golden["ids"].tolist()
    bos = tok.bos_token_id
    ours = [i for row in encode_ordinary(tok, _docs(text)[:3]) for i in [bos, *row]]
    assert ours == golden["docs_bos"].tolist()


def test_typed_special_strings_stay_text(nanochat):
    _, _, tok = nanochat
    ids = encode_ordinary(tok, "say <|bos|> and <|assistant_end|>")
    assert not set(ids) & set(tok.convert_tokens_to_ids(SPECIAL_TOKENS))
    # the plain HF call matches specials (what a chat template relies on); ours must not have changed that
    assert tok.bos_token_id in tok("say <|bos|>", add_special_tokens=False)["input_ids"]


def test_split_pattern_possessive_quantifiers_match_python_regex():
    # `tokenizers` uses Oniguruma; prove it splits exactly like the `regex` module (which tiktoken's pattern targets)
    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    texts = [c["text"] for c in json.loads((FIXTURES / "nanochat_tokenizer" / "encodings.json").read_text())["strings"]]
    texts += ["a++b ?+c  !!!\n\n\r\n  x", "don't WE'LL 123456 ½ ٣٤٥ ——\t\t\n", "    \n    def f(): pass\n"]
    for text in texts:
        assert [p for p, _ in split.pre_tokenize_str(text)] == regex.findall(SPLIT_PATTERN, text), text


# ---- saving and loading ---------------------------------------------------------------------------------------------

def test_saved_directory_loads_everywhere(tmp_path, nanochat):
    src, _, _ = nanochat
    out = tmp_path / "tok"
    tok = convert_nanochat_tokenizer(str(src), str(out))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4.x and TGI know this name
    assert "{% generation %}" in cfg["chat_template"]  # template inside the config, as TGI reads it
    assert not (out / "chat_template.jinja").exists()
    loaded = AutoTokenizer.from_pretrained(out)
    text = "Unicode 你好 🌍 and 12345 <|bos|>"
    assert encode_ordinary(loaded, text) == encode_ordinary(tok, text)
    assert loaded.chat_template == tok.chat_template and loaded.eos_token == "<|assistant_end|>"
    assert torch.equal(load_token_bytes(out), torch.load(src / "token_bytes.pt"))


def test_conversion_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.pkl"):
        convert_nanochat_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="token_bytes.pt"):
        load_token_bytes(str(tmp_path))


# ---- training our own BPE -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_docs():
    return _docs(shared_path("text_sample.txt").read_text(encoding="utf-8"))


@pytest.mark.parametrize("vocab_size", [512, 2048])
def test_trained_bpe_reaches_vocab_and_compresses_like_rustbpe(sample_docs, vocab_size):
    tok = train_bpe(iter(sample_docs), vocab_size, show_progress=False)
    assert len(tok) == vocab_size
    n_mergeable = vocab_size - len(SPECIAL_TOKENS)
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(n_mergeable, vocab_size))
    assert [tok.backend_tokenizer.decode([b]) for b in (65, 97)] == ["A", "a"]  # byte b is id b
    assert compute_token_bytes(tok)[:256].tolist() == [1] * 256

    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(sample_docs), n_mergeable, pattern=SPLIT_PATTERN)
    text = "".join(sample_docs)
    ours, theirs = len(encode_ordinary(tok, text)), len(ref.encode(text))
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)
    assert tok.decode(encode_ordinary(tok, text)) == text


def test_too_small_corpus_fails_clearly():
    with pytest.raises(ValueError, match="corpus too small.*lower --vocab-size"):
        train_bpe(["hello world, hello there"] * 3, 1024, show_progress=False)
    with pytest.raises(ValueError, match="at least 265"):
        train_bpe(["x"], 100, show_progress=False)


# ---- recipes and bench ---------------------------------------------------------------------------------------------

def _main(script):
    return runpy.run_path(str(REPO / script), run_name="imported_by_test")["main"]


def test_recipe_trains_from_jsonl_and_parquet(tmp_path, sample_docs, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "jsonl").mkdir()
    with open(tmp_path / "jsonl" / "a.jsonl", "w") as f:
        for d in sample_docs[:6]:
            f.write(json.dumps({"content": d}) + "\n")
    pq.write_table(pa.table({"text": sample_docs[:6]}), tmp_path / "docs.parquet")
    train = _main("recipes/tokenizer.py")
    for data, extra in [(tmp_path / "jsonl", ["--text-column", "content"]), (tmp_path / "docs.parquet", [])]:
        out = tmp_path / f"out_{data.name}"
        train(["--data", str(data), "--vocab-size", "600", "--output-dir", str(out), *extra])
        tok = AutoTokenizer.from_pretrained(out)
        assert len(tok) == 600 and load_token_bytes(out).shape == (600,)
    capsys.readouterr()
    assert train(["--data", str(tmp_path / "docs.parquet"), "--output-dir", str(tmp_path / "x"),
                  "--text-column", "body"]) == 2  # a user error: `error: ...`, exit status 2
    assert "--text-column" in capsys.readouterr().err


@pytest.mark.slow
def test_recipe_reports_bad_input_without_traceback(tmp_path, capsys):
    r = subprocess.run([sys.executable, str(REPO / "recipes/tokenizer.py"), "--data", str(tmp_path / "no.parquet"),
                        "--output-dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert _main("recipes/tokenizer.py")(["--data", str(shared_path("text_sample.txt")), "--vocab-size", "32768",
                                          "--output-dir", str(tmp_path / "o")]) == 2
    assert "corpus too small" in capsys.readouterr().err


def test_recipe_converts_and_tok_eval_reports(tmp_path, capsys):
    out = tmp_path / "conv"
    _main("recipes/tokenizer.py")(["--convert", str(FIXTURES / "nanochat_tokenizer_4k"), "--output-dir", str(out)])
    _main("recipes/tokenizer.py")(["--convert", str(FIXTURES / "nanochat_tokenizer"), "--output-dir", str(tmp_path / "s")])
    capsys.readouterr()
    _main("recipes/tok_eval.py")(["--tokenizer", f"v4k={out}", "--tokenizer", f"v512={tmp_path / 's'}",
                                  "--no-baselines", "--json", str(tmp_path / "r.json")])
    table = capsys.readouterr().out
    assert table.startswith("| text | bytes |") and "python_code" in table and "v512 vs v4k" in table
    result = json.loads((tmp_path / "r.json").read_text())
    code = result["v4k"]["python_code"]
    assert code["ratio"] == pytest.approx(code["bytes"] / code["tokens"])
    assert code["ratio"] > result["v512"]["python_code"]["ratio"] > 1  # the bigger vocab compresses more


def test_bench_emits_json(tmp_path, capsys):
    _main("bench/tokenizer.py")(["--vocab-size", "1024", "--max-chars", "300000", "--output", str(tmp_path / "b.json")])
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["ours"]["vocab"] == 1024 and report["ours"]["train_s"] > 0
    assert report["corpus"]["chars"] >= 300_000
    assert abs(report["ours_tokens_vs_rustbpe_pct"]) < 1.0
