"""The prompts GRPO samples from, by name: each a TRL prompt dataset (``prompt`` = chat messages) carrying the
columns its rewards read (rl/rewards.py). ``recipes/grpo.py`` picks one with ``prompts: gsm8k``."""

from __future__ import annotations

from collections.abc import Callable

from modeling_nanochat.utils.errors import NanochatError


def gsm8k_prompt_dataset(data=None, split: str = "train", limit: int | None = None):
    """GSM8K ("main") as a TRL prompt dataset: ``prompt`` = ``[{"role": "user", "content": question}]``, ``answer`` =
    the reference solution (read by rewards.gsm8k_reward). Rows are in nanochat's order (shuffled with seed 42).

    Args:
        data: None for ``openai/gsm8k`` from the Hub (or the local ``datasets`` cache), or a local .jsonl/.json/
            .parquet file or folder in the Hub dataset's format (``question``, ``answer``).
        split: "train" or "test".
        limit: keep the first ``limit`` rows (nanochat evaluates RL on the first 400 test problems).
    """
    from evaluation.tasks.common import HubSource
    from evaluation.tasks.gsm8k import GSM8K

    if split not in ("train", "test"):
        raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
    rows = GSM8K(data, source=HubSource("openai/gsm8k", "main", split)).rows
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    keep = {"question", "answer"}
    rows = rows.remove_columns([c for c in rows.column_names if c not in keep])
    return rows.map(lambda row: {"prompt": [{"role": "user", "content": row["question"]}]},
                    remove_columns=["question"])


PROMPTS: dict[str, Callable] = {"gsm8k": gsm8k_prompt_dataset}


def prompt_dataset(name: str, data=None, split: str = "train", limit: int | None = None):
    """The prompt dataset registered as ``name`` (see PROMPTS), from ``data`` (None: its Hub source)."""
    if name not in PROMPTS:
        raise NanochatError(f"unknown prompts {name!r}: choose one of {sorted(PROMPTS)} (modeling_nanochat/rl/prompts.py)")
    return PROMPTS[name](data, split, limit)
