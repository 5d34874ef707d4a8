"""Tokenizer benchmark: BPE training time at vocab 32768 and batch-encoding throughput, printed as JSON.

    python bench/tokenizer.py                       # fixed corpus: this Python's standard library sources
    python bench/tokenizer.py --data DIR_OR_HUB_ID --max-chars 100000000 --vocab-size 32768

Ours = HF `tokenizers` (recipes/tokenizer.py). When installed, rustbpe (nanochat's trainer) is trained on the same
documents and its merges are run with tiktoken (nanochat's inference path), so the JSON compares training time,
encoding throughput and compression at the same vocab size. The default corpus is the sorted *.py files of the
standard library cut into 10,000-char documents: the same bytes on every machine with the same Python version.
"""

import argparse
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenizers  # noqa: E402

from modeling_nanochat.tokenizer.tokenizer import (  # noqa: E402
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    encode_ordinary,
    iter_training_texts,
    load_text_source,
    train_bpe,
)


def stdlib_corpus(max_chars: int, doc_cap: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, n = [], 0
    for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
        text = path.read_text(encoding="utf-8", errors="replace")
        for i in range(0, len(text), doc_cap):
            docs.append(text[i:i + doc_cap])
            n += len(docs[-1])
            if n >= max_chars:
                return docs
    return docs


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def stats(library, vocab, train_s, encode_s, ids, n_bytes):
    n_tokens = sum(map(len, ids))
    return {"library": library, "vocab": vocab, "train_s": round(train_s, 3), "encode_batch_s": round(encode_s, 3),
            "encode_mb_per_s": round(n_bytes / encode_s / 1e6, 2), "tokens": n_tokens,
            "bytes_per_token": round(n_bytes / n_tokens, 4)}


def bench_ours(docs, vocab_size, n_bytes):
    tok, train_s = timed(lambda: train_bpe(iter(docs), vocab_size, show_progress=False))
    ids, enc_s = timed(lambda: encode_ordinary(tok, docs))
    return stats(f"tokenizers {tokenizers.__version__}", len(tok), train_s, enc_s, ids, n_bytes)


def bench_rustbpe(docs, vocab_size, n_bytes):
    """nanochat's path: rustbpe training, tiktoken inference. None when either is missing."""
    try:
        import rustbpe
        import tiktoken
    except ImportError:
        return None
    trainer = rustbpe.Tokenizer()
    _, train_s = timed(lambda: trainer.train_from_iterator(iter(docs), vocab_size - len(SPECIAL_TOKENS),
                                                           pattern=SPLIT_PATTERN))
    ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
    specials = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="bench", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    ids, enc_s = timed(lambda: enc.encode_ordinary_batch(docs))
    return stats(f"rustbpe + tiktoken {tiktoken.__version__}", enc.n_vocab, train_s, enc_s, ids, n_bytes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="hub id, file or directory (default: the standard library's *.py sources)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--max-chars", type=int, default=20_000_000)
    p.add_argument("--doc-cap", type=int, default=10_000)
    p.add_argument("--no-compare", action="store_true", help="skip the rustbpe/tiktoken comparison")
    p.add_argument("--output", help="also write the JSON here")
    args = p.parse_args(argv)

    if args.data:
        docs = list(iter_training_texts(load_text_source(args.data), max_chars=args.max_chars, doc_cap=args.doc_cap))
    else:
        docs = stdlib_corpus(args.max_chars, args.doc_cap)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    report = {
        "corpus": {"source": args.data or f"python {platform.python_version()} stdlib *.py", "docs": len(docs),
                   "chars": sum(map(len, docs)), "bytes": n_bytes},
        "vocab_size": args.vocab_size,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "ours": bench_ours(docs, args.vocab_size, n_bytes),
    }
    if not args.no_compare:
        report["rustbpe_tiktoken"] = bench_rustbpe(docs, args.vocab_size, n_bytes)
        if report["rustbpe_tiktoken"]:
            ref = report["rustbpe_tiktoken"]["tokens"]
            report["ours_tokens_vs_rustbpe_pct"] = round((report["ours"]["tokens"] - ref) / ref * 100, 3)
    out = json.dumps(report, indent=2)
    print(out)
    if args.output:
        Path(args.output).write_text(out + "\n")


if __name__ == "__main__":
    main()
