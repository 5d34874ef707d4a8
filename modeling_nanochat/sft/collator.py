"""nanochat's SFT packing (NANOCHAT_REFERENCE §5.5): best-fit rows of whole conversations, BOS padding, no cropping.

Per rank, as nanochat's ``sft_data_generator_bos_bestfit``:

* the rank reads conversations ``rank, rank + world, ...`` of the mixture (wrapping around at the end) into a buffer
  kept at 100 conversations;
* a row holds ``T + 1`` tokens (inputs are ``row[:-1]``, targets ``row[1:]``). It is filled with the largest buffered
  conversation that still fits whole (the earliest fetched among equals); when none fits, the rest of the row is BOS
  padding. Conversations are never cropped here (the renderer already caps them at 2048 tokens);
* targets are ignored (-100, the loss's ignore_index) where the loss mask of the target token is 0 (BOS, user turns,
  ``<|assistant_start|>``, tool outputs) and on the padding;
* conversations in a row attend to each other: plain causal attention over the whole row, ``position_ids`` 0..T-1
  (TRL's own packing would restart positions per conversation, which nanochat does not do);
* one epoch ends after the micro-batch in which some rank has consumed the whole mixture (nanochat's
  ``consumed >= dataset size``, all-reduced with MAX).

Packing only needs the conversations' lengths, so the whole epoch is planned up front (``plan_epoch``): the Trainer
then knows the exact number of steps, resuming is a matter of skipping rows, and every rank agrees on when the epoch
ends without communicating. ``PackedSFTCollator`` turns planned rows (lists of mixture indices) into tensors.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100  # transformers' and our loss's ignore_index (nanochat uses -1 with its own loss)
BUFFER_SIZE = 100


class BestFitPacker:
    """One rank's stream of packed rows over a mixture given by its conversation ``lengths``.

    ``next_row()`` returns the mixture indices of the next row's conversations in order (the rest of the row is
    padding). ``consumed`` counts like nanochat's (starts at ``rank``, + ``world_size`` per packed conversation) and
    ``epoch`` is the fetch cursor's pass over the data (starting at 1)."""

    def __init__(self, lengths: Sequence[int], row_capacity: int, rank: int = 0, world_size: int = 1,
                 buffer_size: int = BUFFER_SIZE):
        if not len(lengths):
            raise ValueError("nothing to pack: the mixture is empty")
        longest = max(lengths)
        if longest > row_capacity:
            raise ValueError(f"a conversation has {longest} tokens, more than a row holds ({row_capacity}); render "
                             f"with max_tokens <= {row_capacity} (T + 1)")
        self.lengths, self.row_capacity = lengths, row_capacity
        self.rank, self.world_size, self.buffer_size = rank, world_size, buffer_size
        self.cursor, self.consumed, self.epoch = rank % len(lengths), rank, 1
        # the buffer, sorted by (length, -fetch number): the entry just left of bisect((room, inf)) is the longest
        # conversation that fits and, among equally long ones, the earliest fetched -- what a linear scan for the
        # first strictly longer candidate (nanochat) picks
        self._buffer: list[tuple[int, int, int]] = []  # (length, -fetch number, mixture index)
        self._fetched = 0

    def _refill(self) -> None:
        n = len(self.lengths)
        while len(self._buffer) < self.buffer_size:
            bisect.insort(self._buffer, (int(self.lengths[self.cursor]), -self._fetched, self.cursor))
            self._fetched += 1
            self.cursor += self.world_size
            if self.cursor >= n:
                self.cursor %= n
                self.epoch += 1

    def next_row(self) -> list[int]:
        row, used = [], 0
        while used < self.row_capacity:
            self._refill()
            room = self.row_capacity - used
            pos = bisect.bisect_right(self._buffer, (room, math.inf, math.inf))
            if pos == 0:
                break  # nothing fits: the rest of the row is padding
            length, _, index = self._buffer.pop(pos - 1)
            row.append(index)
            used += length
            self.consumed += self.world_size
        return row


@dataclass
class PackingPlan:
    """Rows (lists of mixture indices) per rank, ``micro_batches`` batches of ``batch_size`` rows each."""

    rows: list[list[list[int]]]
    batch_size: int
    micro_batches: int  # per rank
    epoch_micro_batches: int  # the micro-batch (1-based) in which some rank finished the mixture
    consumed: list[int] = field(default_factory=list)  # per rank, at the end of the plan

    @property
    def world_size(self) -> int:
        return len(self.rows)

    def global_rows(self) -> list[list[int]]:
        """All rows in the order Accelerate deals them out: global batch ``k * world + r`` is rank r's k-th batch
        (a sequential sampler; batches go to the processes round robin)."""
        out = []
        for k in range(self.micro_batches):
            for rank_rows in self.rows:
                out += rank_rows[k * self.batch_size:(k + 1) * self.batch_size]
        return out


def plan_epoch(lengths: Sequence[int], *, batch_size: int, row_capacity: int, world_size: int = 1,
               grad_accum_steps: int = 1, buffer_size: int = BUFFER_SIZE) -> PackingPlan:
    """One epoch of packed rows for every rank, rounded up to whole optimizer steps (``grad_accum_steps`` micro-batches
    each; the micro-batches after the epoch's end continue into the next pass, as nanochat's cursor does).

    nanochat stops one micro-batch earlier: its loop prefetches the next batch and the one that crosses the end of
    the data is never trained on; here every conversation is trained on at least once."""
    packers = [BestFitPacker(lengths, row_capacity, r, world_size, buffer_size) for r in range(world_size)]
    rows = [[] for _ in range(world_size)]
    n, epoch_end = len(lengths), None
    micro = 0
    while epoch_end is None or micro % grad_accum_steps:
        for packer, rank_rows in zip(packers, rows):
            rank_rows += [packer.next_row() for _ in range(batch_size)]
        micro += 1
        if epoch_end is None and any(p.consumed >= n for p in packers):
            epoch_end = micro
    return PackingPlan(rows, batch_size, micro, epoch_end, [p.consumed for p in packers])


def plan_stream(lengths: Sequence[int], *, batch_size: int, row_capacity: int, micro_batches: int,
                world_size: int = 1, buffer_size: int = BUFFER_SIZE) -> PackingPlan:
    """The first ``micro_batches`` batches of every rank's stream, wrapping around the data as often as needed
    (nanochat's val loader, rebuilt from scratch for every evaluation)."""
    packers = [BestFitPacker(lengths, row_capacity, r, world_size, buffer_size) for r in range(world_size)]
    rows = [[p.next_row() for _ in range(batch_size * micro_batches)] for p in packers]
    return PackingPlan(rows, batch_size, micro_batches, 0, [p.consumed for p in packers])


class PackedSFTCollator:
    """Planned rows -> ``input_ids`` (B, T), ``labels`` (B, T; already shifted: label t is the target of input t),
    ``position_ids`` (B, T) = 0..T-1. No ``attention_mask``: attention is causal over the whole row.

    ``conversations[i]`` must give ``(ids, mask)`` of mixture index i (an ``data.SFTMixture``). A feature is a
    row's list of indices, or a mapping with it under ``"conversations"`` (a ``datasets`` row)."""

    def __init__(self, conversations, bos_token_id: int, seq_len: int, ignore_index: int = IGNORE_INDEX):
        self.conversations, self.bos_token_id, self.seq_len = conversations, bos_token_id, seq_len
        self.ignore_index = ignore_index

    def __call__(self, features: list) -> dict[str, torch.Tensor]:
        rows = [f["conversations"] if isinstance(f, Mapping) else f for f in features]
        capacity = self.seq_len + 1
        tokens = torch.full((len(rows), capacity), self.bos_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), capacity), dtype=torch.bool)  # padding: mask 0
        for b, row in enumerate(rows):
            pos = 0
            for index in row:
                ids, conv_mask = self.conversations[int(index)]
                end = pos + len(ids)
                if end > capacity:
                    raise ValueError(f"row {b} holds {end} tokens, more than T + 1 = {capacity}: the plan was made "
                                     "for another sequence length")
                tokens[b, pos:end] = torch.as_tensor(ids, dtype=torch.long)
                mask[b, pos:end] = torch.as_tensor(conv_mask, dtype=torch.bool)
                pos = end
        labels = tokens[:, 1:].clone()
        labels[~mask[:, 1:]] = self.ignore_index  # unsupervised targets, and every target that is padding
        positions = torch.arange(self.seq_len, dtype=torch.long).repeat(len(rows), 1)
        return {"input_ids": tokens[:, :-1].contiguous(), "labels": labels, "position_ids": positions}


__all__ = ["BestFitPacker", "PackingPlan", "plan_epoch", "plan_stream", "PackedSFTCollator", "IGNORE_INDEX",
           "BUFFER_SIZE"]
