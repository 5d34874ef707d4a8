"""Batched scoring of CORE sequences: many examples per forward, the same answers as one example per forward.

nanochat runs one forward per example (its options padded together) and computes the loss at every position. Here
all sequences of a task (this rank's share) are sorted by length and cut into batches of at most `batch_size` rows
and `max_batch_tokens` padded tokens, right-padded with BOS (as nanochat pads), without an attention mask (as nanochat): in a causal
model right padding never reaches a real position, so each sequence gets the losses it gets alone, up to the float
rounding of other matmul shapes, and the attention keeps its causal fast path. When the model takes ``logits_to_keep`` (transformers' causal LMs do), logits are
computed only from the batch's first scored position on: most of a few-shot prompt is context nobody scores.

The options of a multiple_choice or schema example share a long few-shot prefix, which nanochat (and the plain path
here) recomputes for every option. With `share_prefix` (the default, for models whose forward takes a KV cache and
position_ids) the examples' prefixes run once, left-padded, and the cache is copied to one row per option, whose
suffix alone is run on it (`Scorer._score_shared`): 2-4x fewer tokens on 4-option tasks, the same answers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modeling_nanochat.generation.hf_cache import cache_kwargs, output_cache

from .core_prompts import ScoredSequence, common_length


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


@dataclass
class SharedItem:
    """One example whose options (`members`, indices into the scored sequences) agree on their first `prefix` tokens."""
    members: list[int]
    prefix: int


def shared_prefix_length(seqs: list[ScoredSequence]) -> int:
    """The tokens every sequence agrees on, capped at min(start) - 1: the position that predicts an option's first
    scored token must run in the suffix forward (its logits are read there), so every option keeps >= 1 token."""
    return min(common_length([s.tokens for s in seqs]), min(s.start for s in seqs) - 1)


def split_shared(seqs: list[ScoredSequence], groups: list | None) -> tuple[list[SharedItem], list[int]]:
    """(examples of >= 2 sequences with a common prefix, indices of the sequences scored alone). `groups[i]` names the
    example sequence i belongs to; language_modeling examples have one sequence and gain nothing from a cache."""
    if groups is None:
        return [], list(range(len(seqs)))
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    items, alone = [], []
    for idx in members.values():
        prefix = shared_prefix_length([seqs[i] for i in idx]) if len(idx) > 1 else 0
        if prefix >= 1:
            items.append(SharedItem(idx, prefix))
        else:
            alone += idx
    return items, sorted(alone)


def plan_shared_batches(items: list[SharedItem], seqs: list[ScoredSequence], batch_size: int,
                        max_batch_tokens: int) -> list[list[SharedItem]]:
    """Examples grouped longest prefix first. A batch holds at most `batch_size` options (the suffix forward's rows)
    and `max_batch_tokens` padded tokens over both forwards (prefixes + suffixes); one example always fits."""
    batches, current, suffix, rows = [], [], 0, 0
    for item in sorted(items, key=lambda it: -it.prefix):
        width = max([suffix] + [len(seqs[i].tokens) - item.prefix for i in item.members])
        n = rows + len(item.members)
        tokens = (len(current) + 1) * (current[0].prefix if current else item.prefix) + n * width
        if current and (n > batch_size or tokens > max_batch_tokens):
            batches.append(current)
            current, rows = [], 0
            width, n = max(len(seqs[i].tokens) - item.prefix for i in item.members), len(item.members)
        current.append(item)
        suffix, rows = width, n
    if current:
        batches.append(current)
    return batches


class Scorer:
    """Scores CORE sequences in batches. With `share_prefix` (default) and a model whose forward takes a KV cache and
    position_ids, the options of one example (which share a long few-shot prefix) are scored with that prefix run
    once: nanochat, and the plain path here, recompute the whole prompt for every option (4 options: ~4x the work).
    Pass `groups` (the example of each sequence) to `score`/`n_batches` to use it."""

    def __init__(self, model, pad_id: int, device, batch_size: int = 32, max_batch_tokens: int | None = None,
                 share_prefix: bool = True):
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
        self._use_cache_arg = "use_cache" in params
        takes_cache = "cache" in params or "past_key_values" in params
        self.share_prefix = share_prefix and takes_cache and "position_ids" in params
        self.forwards = 0  # forwards run so far (tests check which path ran)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, keep: int, use_cache: bool = False, **extra):
        kwargs = {"input_ids": ids.to(self.device), **extra}
        if mask is not None:
            kwargs["attention_mask"] = mask.to(self.device)
        if self._keep:
            kwargs["logits_to_keep"] = keep
        if self._use_cache_arg:
            kwargs["use_cache"] = use_cache
        self.forwards += 1
        return self.model(**kwargs)

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int, **kwargs) -> torch.Tensor:
        out = self._forward(ids, mask, keep, **kwargs)
        logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
        return logits[:, -keep:]

    def idle_forward(self) -> None:
        """A 1-token forward, so that every rank runs as many forwards as the busiest one (ZeRO-3/FSDP models
        gather their weights inside forward, with all ranks taking part)."""
        self._logits(torch.full((1, 1), self.pad_id), torch.ones(1, 1, dtype=torch.long), 1)

    def _plans(self, seqs: list[ScoredSequence], groups: list | None):
        items, alone = split_shared(seqs, groups if self.share_prefix else None)
        plain = plan_batches([len(seqs[i].tokens) for i in alone], self.batch_size, self.max_batch_tokens)
        shared = plan_shared_batches(items, seqs, self.batch_size, self.max_batch_tokens)
        return [[alone[j] for j in batch] for batch in plain], shared

    def n_batches(self, seqs: list[ScoredSequence], groups: list | None = None) -> int:
        """The forwards `score` runs for these arguments (a shared-prefix batch runs two)."""
        plain, shared = self._plans(seqs, groups)
        return len(plain) + 2 * len(shared)

    @torch.no_grad()
    def score(self, seqs: list[ScoredSequence], on_batch: Callable[[list[int]], None] | None = None,
              groups: list | None = None) -> list[SequenceScore]:
        """Scores of `seqs`; `groups[i]` (optional) names the example of sequence i, whose options then share their
        common prefix's forward. `on_batch` gets the indices of each batch's sequences once they are scored."""
        out: list[SequenceScore | None] = [None] * len(seqs)
        plain, shared = self._plans(seqs, groups)
        for batch in shared:
            self._score_shared(seqs, batch, out)
            if on_batch is not None:
                on_batch([i for item in batch for i in item.members])
        for batch in plain:
            self._score_plain(seqs, batch, out)
            if on_batch is not None:
                on_batch(batch)
        return out

    def _score_plain(self, seqs: list[ScoredSequence], batch: list[int], out: list) -> None:
        """Whole sequences, right-padded, one per row."""
        width = len(seqs[batch[0]].tokens)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, :len(seqs[i].tokens)] = torch.tensor(seqs[i].tokens)
        first = min(seqs[i].start for i in batch) - 1  # the first position whose logits are read
        # No attention mask, as nanochat passes none: in a causal model right padding never reaches a real
        # position, and without a padding mask the attention may take its causal fast path instead of a dense
        # mask built per batch (most of a 10-shot language-modeling batch's time went to that mask)
        logits = self._logits(ids, None, width - first)
        self._pick(logits, [(seqs[i], i, 1 + first) for i in batch], out)

    def _score_shared(self, seqs: list[ScoredSequence], batch: list[SharedItem], out: list) -> None:
        """Two forwards: the examples' prefixes (left-padded, so each row's last cached position is its last real
        token, which our model's smear reads from the cache), then every option's suffix (right-padded) on a copy of
        its example's cache row, positions continuing the prefix."""
        width = batch[0].prefix
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for k, item in enumerate(batch):
            ids[k, width - item.prefix:] = torch.tensor(seqs[item.members[0]].tokens[:item.prefix])
            mask[k, width - item.prefix:] = 1
        prefix_out = self._forward(ids, mask, 1, use_cache=True, position_ids=_positions(mask).to(self.device))
        cache = output_cache(prefix_out)
        if cache is None:
            raise RuntimeError(f"{type(unwrap(self.model)).__name__} returned no KV cache; use share_prefix=False")
        rows = [(k, i) for k, item in enumerate(batch) for i in item.members]
        cache.batch_select_indices(torch.tensor([k for k, _ in rows], device=self.device))
        suffix = max(len(seqs[i].tokens) - batch[k].prefix for k, i in rows)
        sids = torch.full((len(rows), suffix), self.pad_id, dtype=torch.long)
        smask = torch.zeros((len(rows), suffix), dtype=torch.long)
        for r, (k, i) in enumerate(rows):
            tail = seqs[i].tokens[batch[k].prefix:]
            sids[r, :len(tail)] = torch.tensor(tail)
            smask[r, :len(tail)] = 1
        lengths = torch.tensor([batch[k].prefix for k, _ in rows])
        positions = lengths[:, None] + torch.arange(suffix)[None]
        # the first suffix column whose logits are read (the cap in shared_prefix_length keeps it >= 0)
        first = min(seqs[i].start - 1 - batch[k].prefix for k, i in rows)
        full_mask = torch.cat([mask[[k for k, _ in rows]], smask], dim=1)  # past + current, as transformers wants
        logits = self._logits(sids, full_mask, suffix - first, use_cache=True,
                              position_ids=positions.to(self.device), **cache_kwargs(unwrap(self.model), cache))
        self._pick(logits, [(seqs[i], i, batch[k].prefix + first + 1) for k, i in rows], out)

    @staticmethod
    def _pick(logits: torch.Tensor, rows: list[tuple[ScoredSequence, int, int]], out: list) -> None:
        """Losses and greedy tokens of each row's scored span. rows: (sequence, its index in `out`, the position of
        the token that logits column 0 predicts)."""
        cols, targets, row_ids, spans = [], [], [], []
        for r, (s, _, offset) in enumerate(rows):
            row_ids += [r] * (s.end - s.start)
            cols += range(s.start - offset, s.end - offset)  # position p predicts token p + 1
            targets += s.tokens[s.start:s.end]
            spans.append(s.end - s.start)
        index = dict(dtype=torch.long, device=logits.device)
        picked = logits[torch.tensor(row_ids, **index), torch.tensor(cols, **index)].float()
        losses = F.cross_entropy(picked, torch.tensor(targets, **index), reduction="none").cpu()
        greedy = picked.argmax(-1).cpu()
        pos = 0
        for (_, i, _), n in zip(rows, spans):
            out[i] = SequenceScore(losses[pos:pos + n].mean().item(), greedy[pos:pos + n].tolist())
            pos += n


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, ... along each row's real tokens (left padding: pads get 0, they are masked anyway)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
