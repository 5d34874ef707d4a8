"""Train nanochat's tokenizer (byte-level BPE, nanochat's split pattern and special tokens) with HF `tokenizers`.

    python recipes/tokenizer.py --data karpathy/climbmix-400b-shuffle --vocab-size 32768 --output-dir out/tokenizer
    python recipes/tokenizer.py --data ../shared/data/text_sample.txt --vocab-size 4096 --output-dir /tmp/tok

--data is a hub dataset id, a parquet/jsonl/txt file or a directory of them (streamed with `datasets`).
The output directory loads with `AutoTokenizer.from_pretrained` (transformers 4.5x and 5.x) and holds
`token_bytes.pt` for bits-per-byte. Defaults follow nanochat's tok_train.py (2B chars, documents cropped to
10,000 chars). Use --convert to turn a nanochat tokenizer.pkl directory into the same format instead.
"""

import argparse
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

SANITY_TEXT = "Hello world! Numbers: 123, 4567. Contractions: I'm, you're. Code: x = f(y) ** 2\nUnicode: 你好 🌍 <|bos|>"


def main(argv=None):
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
        texts = iter_training_texts(load_text_source(args.data, args.split), args.text_column, args.max_chars,
                                    args.doc_cap)
        tokenizer = train_bpe(texts, args.vocab_size)
        save_tokenizer(tokenizer, args.output_dir)
    seconds = time.time() - t0

    ids = encode_ordinary(tokenizer, SANITY_TEXT)
    if tokenizer.decode(ids) != SANITY_TEXT:
        raise RuntimeError("round trip failed: decode(encode(text)) != text")
    print(f"vocab {len(tokenizer):,} | {seconds:.1f}s | saved to {args.output_dir}")
    print(f"sanity text: {len(SANITY_TEXT.encode())} bytes -> {len(ids)} tokens")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, ImportError) as e:  # bad input: say why, no trace
        sys.exit(f"error: {e}")
