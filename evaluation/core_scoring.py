"""Batched scoring of CORE sequences: many examples per forward, the same answers as one example per forward.

nanochat runs one forward per example (its options padded together) and computes the loss at every position. Here
all sequences of a task (this rank's share) are sorted by length and cut into batches of at most `batch_size` rows
and `max_batch_tokens` padded tokens, right-padded with BOS (as nanochat pads) plus an attention_mask. In a causal
model right padding never reaches a real position, so each sequence gets the losses it gets alone, up to the float
rounding of other matmul shapes. When the model takes ``logits_to_keep`` (transformers' causal LMs do), logits are
computed only from the batch's first scored position on: most of a few-shot prompt is context nobody scores.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .core_prompts import ScoredSequence


@dataclass
class SequenceScore:
    mean_loss: float  # mean cross-entropy (nats) over the scored span; nan for an empty span, as in nanochat
    argmax: list[int]  # the greedy token at each scored position


def unwrap(model):
    """The model inside DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def position_limit(model) -> int | None:
    """The longest input the model can take at all: the size of its learned position table (GPT-2's `wpe`, OPT's
    `embed_positions`). Rotary/ALiBi models, nanochat's included, have none: prompts are never cut for them."""
    model = unwrap(model)
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and module is not inputs and (leaf == "wpe" or "position" in leaf):
            return module.num_embeddings - int(getattr(module, "offset", 0))  # OPT's table has 2 extra rows
    return None


def crop_left(seq: ScoredSequence, limit: int | None) -> tuple[ScoredSequence, bool]:
    """Keep the last `limit` tokens (nanochat's rule for models with a position limit); returns (seq, was_cut)."""
    if limit is None or len(seq.tokens) <= limit:
        return seq, False
    cut = len(seq.tokens) - limit
    if seq.start - cut < 1:
        raise ValueError(f"a scored continuation of {seq.end - seq.start} tokens does not fit in the model's "
                         f"{limit}-position limit")
    return ScoredSequence(seq.tokens[cut:], seq.start - cut, seq.end - cut), True


def plan_batches(lengths: list[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first (out-of-memory shows on the first batch, padding stays small)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) == batch_size or (len(current) + 1) * width > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def default_max_batch_tokens(device) -> int:
    """A CPU gains nothing from wide batches and loses cache locality (20 arc_easy items, 10-shot, on a d256 model,
    one thread: 8.6 s at ~1k tokens per forward, 9.9 s at 4k, 13.1 s at 8k); short prompts still get batched up to
    batch_size. Accelerators: wide batches keep the device busy."""
    return 2048 if torch.device(device).type == "cpu" else 32768


class Scorer:
    def __init__(self, model, pad_id: int, device, batch_size: int = 32, max_batch_tokens: int | None = None):
        max_batch_tokens = max_batch_tokens or default_max_batch_tokens(device)
        if batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("batch_size and max_batch_tokens must be >= 1")
        while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod  # torch.compile would recompile for every new batch shape; nanochat evaluates
            # its uncompiled model too. Other wrappers (DDP, DeepSpeed) stay: they may gather sharded weights.
        self.model, self.pad_id, self.device = model, pad_id, torch.device(device)
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        params = inspect.signature(unwrap(model).forward).parameters
        self._keep = "logits_to_keep" in params
        self._no_cache = "use_cache" in params

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        kwargs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self._keep:
            kwargs["logits_to_keep"] = keep
        if self._no_cache:
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
        return logits[:, -keep:]

    def idle_forward(self) -> None:
        """A 1-token forward, so that every rank runs as many forwards as the busiest one (ZeRO-3/FSDP models
        gather their weights inside forward, with all ranks taking part)."""
        self._logits(torch.full((1, 1), self.pad_id), torch.ones(1, 1, dtype=torch.long), 1)

    def n_batches(self, seqs: list[ScoredSequence]) -> int:
        return len(plan_batches([len(s.tokens) for s in seqs], self.batch_size, self.max_batch_tokens))

    @torch.no_grad()
    def score(self, seqs: list[ScoredSequence], on_batch: Callable[[list[int]], None] | None = None) \
            -> list[SequenceScore]:
        out: list[SequenceScore | None] = [None] * len(seqs)
        for batch in plan_batches([len(s.tokens) for s in seqs], self.batch_size, self.max_batch_tokens):
            width = len(seqs[batch[0]].tokens)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            rows, cols, targets, spans = [], [], [], []
            first = min(seqs[i].start for i in batch) - 1  # the first position whose logits are read
            for r, i in enumerate(batch):
                s = seqs[i]
                ids[r, :len(s.tokens)] = torch.tensor(s.tokens)
                mask[r, :len(s.tokens)] = 1
                rows += [r] * (s.end - s.start)
                cols += range(s.start - 1 - first, s.end - 1 - first)  # position p predicts token p + 1
                targets += s.tokens[s.start:s.end]
                spans.append(s.end - s.start)
            logits = self._logits(ids, mask, width - first)
            index = dict(dtype=torch.long, device=logits.device)
            picked = logits[torch.tensor(rows, **index), torch.tensor(cols, **index)].float()
            losses = F.cross_entropy(picked, torch.tensor(targets, **index), reduction="none").cpu()
            greedy = picked.argmax(-1).cpu()
            pos = 0
            for i, n in zip(batch, spans):
                out[i] = SequenceScore(losses[pos:pos + n].mean().item(), greedy[pos:pos + n].tolist())
                pos += n
            if on_batch is not None:
                on_batch(batch)
        return out
