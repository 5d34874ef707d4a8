"""Dataset directories for the stock TRL CLI (`trl sft --config recipes/trl/sft.yaml`, `trl grpo --config
recipes/trl/grpo.yaml`), which reads `dataset_name: DIR` with `datasets.load_dataset(DIR)`.

    # nanochat's SFT mixture from the Hub (SmolTalk, MMLU aux x3, GSM8K x4, + your identity conversations x2)
    python recipes/prepare_chat_data.py sft --output-dir data/chat/sft --extra-jsonl identity_conversations.jsonl:2
    python recipes/prepare_chat_data.py grpo --output-dir data/chat/grpo    # openai/gsm8k main
    # offline, from local files in the Hub datasets' formats (DATA/gsm8k/train.jsonl, ...; see sft_data):
    python recipes/prepare_chat_data.py sft --output-dir data/chat_tiny/sft --data-dir DATA --smoltalk-epochs 0 \
        --mmlu-epochs 0 --extra-jsonl my_conversations.jsonl --no-val
    python recipes/prepare_chat_data.py grpo --output-dir data/chat_tiny/grpo --gsm8k ../shared/data/gsm8k/train_sample.jsonl

The SFT mixture is `modeling_nanochat.sft.data`'s (what `recipes/sft.py` trains on), in the same order, kept as
conversations: the stock CLI renders them itself through the tokenizer's chat template.

SFT dir: `train-*.parquet` (and `test-*.parquet`, nanochat's validation mixture) with one column `messages` in TRL's
conversational format. Assistant contents stay nanochat's: a string, or a list of parts `{"type": "text" |
"python" | "python_output", "text": ...}` (GSM8K's calculator calls). The column is stored with the `datasets.Json`
feature, because Arrow needs one type per column and contents are strings in some messages and lists in others;
`load_dataset` gives back exactly these Python objects, and the tokenizer's chat template renders the parts with
nanochat's tokens and loss mask (python calls trained, tool outputs not). Rows are checked with the chat renderer's
validation here, so a bad conversation fails now and not in the middle of TRL's tokenization.

GRPO dir: `train-*.parquet` (and `test-*.parquet`): `prompt` = `[{"role": "user", "content": question}]` and
`answer` = GSM8K's reference solution, which `modeling_nanochat.rl.rewards.gsm8k_reward` grades against. Rows are in
nanochat's order (seed-42 shuffle); recipes/trl/grpo.yaml keeps it (`shuffle_dataset: false`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

ROWS_PER_SHARD = 100_000


def messages_features():
    from datasets import Features, Json, List, Value

    return Features({"messages": List({"role": Value("string"), "content": Json()})})


def to_messages(rows, to_conversation, label: str = "rows", num_proc: int | None = None):
    """``rows`` (a `datasets.Dataset`) turned into one `messages` column (contents as `Json`) by ``to_conversation``
    (row -> nanochat conversation). Each conversation is checked with `chat_format.normalize_messages`; messages keep
    only `role` and `content`. `Dataset.map` writes Arrow batch by batch, so SmolTalk's 460K rows never sit in memory."""

    def convert(batch, indices):
        from modeling_nanochat.tokenizer.chat_format import normalize_messages
        from modeling_nanochat.utils.errors import DataError, NanochatError

        out = []
        for j, index in enumerate(indices):
            conv = to_conversation({k: v[j] for k, v in batch.items()})
            try:
                normalize_messages(conv)
            except NanochatError as e:  # DataError: the problem and its fix
                raise DataError(f"{label} row {index}: {e.problem}", e.fix) from None
            except ValueError as e:
                raise DataError(f"{label} row {index}: {e}", "fix or drop that row of the source") from None
            out.append([{"role": m["role"], "content": m["content"]} for m in conv["messages"]])
        return {"messages": out}

    return rows.map(convert, batched=True, with_indices=True, remove_columns=rows.column_names,
                    features=messages_features(), num_proc=num_proc, desc=f"converting {label}")


def write_split(dataset, out_dir: str | os.PathLike, split: str) -> list[str]:
    """`<split>-0000i-of-0000n.parquet` files (the names `load_dataset(DIR)` maps to the split)."""
    n = max(1, -(-len(dataset) // ROWS_PER_SHARD))
    paths = []
    for i in range(n):
        path = Path(out_dir) / f"{split}-{i:05d}-of-{n:05d}.parquet"
        dataset.shard(num_shards=n, index=i, contiguous=True).to_parquet(str(path))
        paths.append(str(path))
    return paths


def write_dataset_dir(splits: dict, out_dir: str, overwrite: bool = False, info: dict | None = None) -> str:
    """Write each split's parquet files (and `prepare_info.json`) into `out_dir`, atomically."""
    from modeling_nanochat.utils.io import atomic_dir

    with atomic_dir(out_dir, overwrite) as tmp:
        for split, ds in splits.items():
            if ds is not None:
                write_split(ds, tmp, split)
        with open(os.path.join(tmp, "prepare_info.json"), "w") as f:
            json.dump({**(info or {}), "rows": {s: len(d) for s, d in splits.items() if d is not None}}, f, indent=2)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# SFT: modeling_nanochat.sft.data's mixture, as conversations instead of rendered tokens


def conversation_parts(split: str = "train", *, data_dir=None, smoltalk_epochs: int = 1, mmlu_epochs: int = 3,
                       gsm8k_epochs: int = 4, extra_jsonl=(), num_proc: int | None = None) -> list[tuple[str, object]]:
    """(name, conversations) once per epoch in nanochat's task order: ``sft/data.py: mixture_parts`` itself (same
    sources, seed-42 source shuffles, val limits), each part a `messages` dataset instead of rendered tokens."""
    from modeling_nanochat.sft import data as sft_data

    return sft_data.mixture_parts(None, split, data_dir=data_dir, smoltalk_epochs=smoltalk_epochs,
                                  mmlu_epochs=mmlu_epochs, gsm8k_epochs=gsm8k_epochs, extra_jsonl=extra_jsonl,
                                  num_proc=num_proc, convert=to_messages)


def sft_mixture(split: str = "train", **kwargs):
    """nanochat's SFT train or val mixture as one `messages` dataset, in the order of ``sft/data.py: SFTMixture`` (the
    flattened (part, row) list shuffled by random.Random(42), nanochat's TaskMixture)."""
    from datasets import concatenate_datasets

    from modeling_nanochat.sft import data as sft_data

    parts = conversation_parts(split, **kwargs)
    if not parts:
        raise ValueError("the SFT mixture is empty: give at least one source or --extra-jsonl file")
    order = list(range(sum(len(d) for _, d in parts)))
    random.Random(sft_data.MIXTURE_SEED).shuffle(order)
    return concatenate_datasets([d for _, d in parts]).select(order)


# ----------------------------------------------------------------------------------------------------------------
# GRPO


def grpo_splits(gsm8k=None, gsm8k_test=None, test: bool = True, test_limit: int = 400, limit: int | None = None):
    from modeling_nanochat.rl.prompts import gsm8k_prompt_dataset

    train = gsm8k_prompt_dataset(gsm8k, "train", limit=limit)
    # local train file and no test file: no test split (never reach for the Hub behind the user's back)
    want_test = test and (gsm8k is None or gsm8k_test is not None)
    evaluate = gsm8k_prompt_dataset(gsm8k_test, "test", limit=test_limit) if want_test else None
    return {"train": train, "test": evaluate}


def main(argv=None):
    from modeling_nanochat.utils.errors import cli_main

    # a bad data file (DataError names the file and line) or a missing one: `error: ...` and exit status 2
    return cli_main(_main, argv, errors=(FileNotFoundError,))


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)

    g = sub.add_parser("grpo", help="GSM8K prompts + answers for `trl grpo`")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--gsm8k", help="train problems: local .jsonl/.json/.parquet file or folder in openai/gsm8k's "
                                   "format (question, answer); default: openai/gsm8k main from the Hub")
    g.add_argument("--gsm8k-test", help="test problems, same formats (default: the Hub, unless --gsm8k is local)")
    g.add_argument("--test-limit", type=int, default=400, help="first N test problems (nanochat evaluates 400)")
    g.add_argument("--no-test", action="store_true", help="write the train split only")
    g.add_argument("--limit", type=int, help="first N train problems (smoke runs)")
    g.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("sft", help="nanochat's SFT mixture as conversations for `trl sft`")
    s.add_argument("--output-dir", required=True)
    s.add_argument("--data-dir", help="local data in the Hub formats, one folder per source (smoltalk/, mmlu/, "
                                      "gsm8k/, e.g. gsm8k/train.jsonl); default: the Hub")
    s.add_argument("--extra-jsonl", action="append", default=[], metavar="PATH[:EPOCHS]",
                   help="conversations to add (identity etc.), one per line; repeatable")
    s.add_argument("--smoltalk-epochs", type=int, default=1)
    s.add_argument("--mmlu-epochs", type=int, default=3)
    s.add_argument("--gsm8k-epochs", type=int, default=4)
    s.add_argument("--no-val", action="store_true", help="write the train split only (else also nanochat's val "
                                                         "mixture as the test split)")
    s.add_argument("--num-proc", type=int, help="processes for the conversion")
    s.add_argument("--overwrite", action="store_true")

    args = p.parse_args(argv)
    if args.stage == "grpo":
        splits = grpo_splits(args.gsm8k, args.gsm8k_test, not args.no_test, args.test_limit, args.limit)
        info = {"stage": "grpo", "gsm8k": args.gsm8k or "openai/gsm8k", "gsm8k_test": args.gsm8k_test}
    else:
        kw = dict(data_dir=args.data_dir, smoltalk_epochs=args.smoltalk_epochs, mmlu_epochs=args.mmlu_epochs,
                  gsm8k_epochs=args.gsm8k_epochs, num_proc=args.num_proc)
        splits = {"train": sft_mixture("train", extra_jsonl=args.extra_jsonl, **kw),
                  "test": None if args.no_val else sft_mixture("val", **kw)}
        info = {"stage": "sft", "data_dir": args.data_dir, "extra_jsonl": args.extra_jsonl,
                **{k: v for k, v in kw.items() if k.endswith("epochs")}}
    write_dataset_dir(splits, args.output_dir, args.overwrite, info)
    rows = ", ".join(f"{k}: {len(v)}" for k, v in splits.items() if v is not None)
    print(f"wrote {args.output_dir} ({rows})")


if __name__ == "__main__":
    sys.exit(main())
