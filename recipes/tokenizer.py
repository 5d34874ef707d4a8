"""Train nanochat's tokenizer (byte-level BPE, nanochat's split pattern and special tokens) with HF `tokenizers`.

    python recipes/tokenizer.py --data karpathy/climbmix-400b-shuffle --vocab-size 32768 --output-dir out/tokenizer
    python recipes/tokenizer.py --data ../shared/data/text_sample.txt --vocab-size 4096 --output-dir /tmp/tok

--data is a hub dataset id, a parquet/jsonl/txt file or a directory of them (streamed with `datasets`).
The output directory loads with `AutoTokenizer.from_pretrained` (transformers 4.5x and 5.x) and holds
`token_bytes.pt` for bits-per-byte. Defaults follow nanochat's tok_train.py (2B chars, documents cropped to
10,000 chars). Use --convert to turn a nanochat tokenizer.pkl directory into the same format instead.
"""

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_nanochat.tokenizer.tokenizer import (  # noqa: E402
    convert_nanochat_tokenizer,
    encode_ordinary,
    iter_training_texts,
    load_text_source,
    save_tokenizer,
    train_bpe,
)
from modeling_nanochat.data.files import diagnose_files  # noqa: E402
from modeling_nanochat.utils.errors import DataError, NanochatError, cli_main  # noqa: E402

SANITY_TEXT = "Hello world! Numbers: 123, 4567. Contractions: I'm, you're. Code: x = f(y) ** 2\nUnicode: 你好 🌍 <|bos|>"


def main(argv=None):
    # bad input (NanochatError, and the errors the tokenizer library raises for a bad corpus or flag): `error: ...`
    # and exit status 2, no traceback
    return cli_main(_main, argv, errors=(ValueError, FileNotFoundError, RuntimeError, KeyError, ImportError))


def corpus_texts(data: str, split: str, text_column: str, max_chars: int, doc_cap: int):
    """The training documents of ``--data`` (``iter_training_texts`` over ``load_text_source``). When reading a
    local corpus fails (`datasets` says "An error occurred while generating the dataset", a codec error without a
    file name, or a bare StopIteration for an empty .jsonl), the files are examined and the DataError naming the
    file and line at fault is raised instead."""
    def read():
        yield from iter_training_texts(load_text_source(data, split), text_column, max_chars, doc_cap)

    docs = read()
    while True:
        try:
            doc = next(docs)
        except StopIteration:
            return
        except (NanochatError, KeyError, FileNotFoundError):  # already say what is wrong
            raise
        except Exception as e:
            problem = diagnose_files([data]) if Path(data).exists() else None
            if problem is None:
                raise
            raise problem from e
        yield doc


def with_text(texts, data: str):
    """``texts`` unchanged, once one document with non-whitespace text was seen; DataError for an empty corpus
    (BPE would otherwise stop at once with a misleading "corpus too small")."""
    texts = iter(texts)
    blank = []
    for doc in texts:
        if doc.strip():
            return itertools.chain(blank, [doc], texts)
        blank.append(doc)
    raise DataError(f"{data}: the corpus is empty: {len(blank)} document(s), none with any text (all empty or only "
                    "whitespace), so there is nothing to train the tokenizer on",
                    "point --data at text: a .txt file, a .jsonl file with a text field per line (--text-column), "
                    "parquet files, or a Hub dataset id")


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="hub dataset id, or a parquet/jsonl/txt file or directory")
    p.add_argument("--convert", metavar="NANOCHAT_TOKENIZER_DIR", help="convert tokenizer.pkl instead of training")
    p.add_argument("--vocab-size", type=int, default=32768, help="including the 9 special tokens (default 32768)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters")
    p.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
    p.add_argument("--text-column", default="text")
    p.add_argument("--split", default="train", help="split of a hub dataset")
    args = p.parse_args(argv)
    if bool(args.data) == bool(args.convert):
        p.error("give exactly one of --data (train) or --convert (nanochat tokenizer.pkl dir)")

    t0 = time.time()
    if args.convert:
        tokenizer = convert_nanochat_tokenizer(args.convert, args.output_dir)
    else:
        texts = with_text(corpus_texts(args.data, args.split, args.text_column, args.max_chars, args.doc_cap),
                          args.data)
        tokenizer = train_bpe(texts, args.vocab_size)
        save_tokenizer(tokenizer, args.output_dir)
    seconds = time.time() - t0

    ids = encode_ordinary(tokenizer, SANITY_TEXT)
    if tokenizer.decode(ids) != SANITY_TEXT:
        raise RuntimeError("round trip failed: decode(encode(text)) != text")
    print(f"vocab {len(tokenizer):,} | {seconds:.1f}s | saved to {args.output_dir}")
    print(f"sanity text: {len(SANITY_TEXT.encode())} bytes -> {len(ids)} tokens")


if __name__ == "__main__":
    sys.exit(main())
