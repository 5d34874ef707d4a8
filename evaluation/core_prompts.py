"""CORE prompts as nanochat builds them, tokenized into the token spans that get scored.

nanochat renders prompts with Jinja templates whose output is plain concatenation, so they are formatted directly
here (tests/evaluation/test_core.py checks the token ids against nanochat's own, item by item):

* each few-shot demonstration is ``context + delimiter + answer`` and a blank line (``"\\n\\n"``), then the item;
* multiple_choice: one prompt per choice, ``query + delimiter + choice``; the scored span starts where the token
  sequences of all choices stop agreeing (common prefix) and runs to the end;
* schema: one prompt per context option, ``option + delimiter + continuation``; the scored span is the common token
  suffix (the continuation, as the options tokenized it);
* language_modeling: contexts are stripped; the prompt without the continuation is stripped too (so a delimiter's
  trailing space joins the continuation's first token), and the scored span is what the full prompt adds to it.

Every sequence starts with BOS. Few-shot examples for item ``idx`` are ``random.Random(1234 + idx).sample`` of the
other indices of the (shuffled, cut) rows — nanochat's seeds, so picks match its own for the same ``max_per_task``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .core_bundle import CoreTask, Row

FEWSHOT_SEED = 1234


@dataclass
class ScoredSequence:
    tokens: list[int]
    start: int  # tokens[start:end] is scored, each predicted from the position before it
    end: int


@dataclass
class Request:
    """One example: its sequences (one per option, or one for language_modeling) and the gold option."""
    idx: int
    sequences: list[ScoredSequence]
    gold: int | None  # None for language_modeling


def bos_token_id(tokenizer) -> int:
    """nanochat's `<|bos|>`; otherwise the tokenizer's BOS (GPT-2: <|endoftext|>, which nanochat also falls back to)."""
    vocab = tokenizer.get_vocab()
    for tid in (vocab.get("<|bos|>"), tokenizer.bos_token_id, vocab.get("<|endoftext|>")):
        if tid is not None:
            return tid
    raise ValueError("the tokenizer has no <|bos|>, bos_token or <|endoftext|>: CORE prepends a BOS token to every "
                     "prompt, as nanochat does; set tokenizer.bos_token")


class PromptEncoder:
    """Text -> ids as nanochat's tokenizer does: ordinary text (a typed "<|bos|>" stays text), BOS prepended."""

    def __init__(self, tokenizer):
        self.bos_id = bos_token_id(tokenizer)
        if hasattr(tokenizer, "backend_tokenizer"):  # fast tokenizers: one batched call through `tokenizers`
            from modeling_nanochat.tokenizer.tokenizer import encode_ordinary
            self._encode = lambda texts: encode_ordinary(tokenizer, texts)
        else:
            self._encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [[self.bos_id, *ids] for ids in self._encode(texts)] if texts else []


def fewshot_indices(idx: int, n: int, k: int) -> list[int]:
    if k == 0:
        return []
    return random.Random(FEWSHOT_SEED + idx).sample([i for i in range(n) if i != idx], k)


def _demonstration(task_type: str, ex: dict, delim: str) -> str:
    if task_type == "multiple_choice":
        return f"{ex['query']}{delim}{ex['choices'][ex['gold']]}"
    if task_type == "schema":
        return f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}"
    return f"{str(ex['context']).strip()}{delim}{ex['continuation']}"


def render(task: CoreTask, rows: list[Row], idx: int) -> list[str]:
    """The prompts of item `idx`: one per option, or [without, with] the continuation for language_modeling."""
    item, delim = rows[idx].data, task.delimiter
    shots = [rows[i].data for i in fewshot_indices(idx, len(rows), task.num_fewshot)]
    head = "".join(_demonstration(task.task_type, ex, delim) + "\n\n" for ex in shots)
    if task.task_type == "multiple_choice":
        return [f"{head}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        return [f"{head}{option}{delim}{item['continuation']}" for option in item["context_options"]]
    without = f"{head}{str(item['context']).strip()}{delim}"
    return [without.strip(), f"{without}{item['continuation']}"]


def common_length(seqs: list[list[int]], from_end: bool = False) -> int:
    """Length of the common prefix (or suffix) of all sequences."""
    n = 0
    for column in zip(*(reversed(s) if from_end else s for s in seqs)):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def _sequences(task: CoreTask, row: Row, ids: list[list[int]]) -> list[ScoredSequence]:
    if task.task_type == "multiple_choice":
        start = common_length(ids)
        return [ScoredSequence(t, start, len(t)) for t in ids]
    if task.task_type == "schema":
        n = common_length(ids, from_end=True)
        return [ScoredSequence(t, len(t) - n, len(t)) for t in ids]
    without, full = ids
    if len(without) >= len(full) or full[:len(without)] != without:
        raise ValueError(f"{row.where}: the prompt without its continuation does not tokenize to a prefix of the "
                         f"prompt with it ({task.label}); this tokenizer splits the context/continuation boundary")
    return [ScoredSequence(full, len(without), len(full))]


def build_requests(task: CoreTask, rows: list[Row], indices, encode: PromptEncoder) -> list[Request]:
    """Render and tokenize the items `indices` of a task (one batched tokenizer call)."""
    indices = list(indices)
    prompts = [render(task, rows, i) for i in indices]
    flat = encode([p for ps in prompts for p in ps])
    out, pos = [], 0
    for i, ps in zip(indices, prompts):
        ids, pos = flat[pos:pos + len(ps)], pos + len(ps)
        gold = rows[i].data.get("gold") if task.task_type != "language_modeling" else None
        out.append(Request(i, _sequences(task, rows[i], ids), gold))
    return out
