"""Pretraining batches as nanochat makes them (§5.2), with a step-exact resumable state.

``PretrainLoader(resolve_data(--data), tokenizer, batch_size=B, seq_len=T, rank=r, world_size=W)`` yields
``(inputs, targets)``, both ``LongTensor[B, T]`` on CPU, forever:

* **Documents**: for each shard of the split (the train shards, or the single val shard), row groups
  ``r, r+W, r+2W, …``; each row group in batches of ``tokenizer_batch_size`` (128) docs; infinite epochs. Each doc
  is ``[BOS] + encode_ordinary(text)`` (typed ``<|bos|>`` strings stay text), encoded a batch at a time by the fast
  tokenizer's multi-threaded batch encoder.
* **Packing** (BOS-aligned best-fit crop): a row has ``T+1`` slots. Before every placement the buffer is topped up
  to ``buffer_size`` (1000) docs, a tokenizer batch at a time; then the largest doc that fits entirely goes in
  (the first such in buffer order); when none fits, the first shortest doc is cropped to fill the row and its
  rest dropped. ``inputs = row[:-1]``, ``targets = row[1:]``, no ignore positions. These are nanochat's rules to
  the tie, so the batches equal nanochat's token for token (tests/data/test_pretrain_data.py checks against golden
  batches from nanochat's own loader). The search is vectorised (numpy over the buffer's lengths), rows are
  filled with array slices, not per token.
* **Exact resume**: ``state_dict()`` holds the stream cursor (epoch, shard, row group, document offset inside the
  row group) and the packing buffer's tokens, so a fresh loader given ``load_state_dict(state)`` yields exactly
  the batch the old one would have yielded next. nanochat's state is only ``(pq_idx, rg_idx, epoch)`` and resumes
  at the next row-group stride with an empty buffer: approximate, it skips and reorders documents. The state has
  torch tensors (a few MB for a 1000-doc buffer): store it with ``torch.save``, not JSON. It is per process: save
  every rank's state and give each rank its own back, with the same world size.

``python -m modeling_nanochat.data.loader --data climbmix -n 170`` downloads shards (nanochat's
``python -m nanochat.dataset -n 170``); sources are described in `modeling_nanochat.data.sources`.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from modeling_nanochat.data.sources import PRESETS, DataSource, download_preset, resolve_data
from modeling_nanochat.tokenizer.tokenizer import BOS_TOKEN, encode_ordinary, special_token_id
from modeling_nanochat.utils.errors import DataError

__all__ = ["DataSource", "PretrainLoader", "resolve_data"]

STATE_FORMAT = "nanochat-hf/pretrain-loader/1"


class _DocStream:
    """The document batches one rank reads, with an explicit cursor instead of a generator's hidden frame."""

    def __init__(self, shards: list, rank: int, world_size: int, batch_docs: int):
        self.shards, self.rank, self.world, self.batch_docs = shards, rank, world_size, batch_docs
        self.epoch, self.shard, self.row_group, self.doc = 1, 0, rank, 0
        self._texts = None  # the current row group's documents, read once
        self._reader = None  # (shard index, reader)
        self._wraps_without_docs = 0

    @property
    def cursor(self) -> dict:
        name = self.shards[self.shard].name if self.shard < len(self.shards) else None
        return {"epoch": self.epoch, "shard": self.shard, "shard_name": name, "row_group": self.row_group,
                "doc": self.doc}

    def seek(self, cursor: dict) -> None:
        name = cursor["shard_name"]
        if name is not None and (cursor["shard"] >= len(self.shards) or self.shards[cursor["shard"]].name != name):
            have = [s.name for s in self.shards]
            raise ValueError(f"the saved loader state was reading shard #{cursor['shard']} {name!r}, but this data "
                             f"source's shards are {have[:3]}{'…' if len(have) > 3 else ''}: resume on the same data")
        self.epoch, self.shard, self.row_group, self.doc = (cursor[k] for k in ("epoch", "shard", "row_group", "doc"))
        self._texts = None

    def next_batch(self) -> list[str]:
        while True:
            if self.shard >= len(self.shards):  # end of an epoch
                self._wraps_without_docs += 1
                if self._wraps_without_docs > 1:
                    raise DataError(f"rank {self.rank} of {self.world} read a whole epoch of its data without a "
                                    "document", "check that the corpus holds documents with text (and, with several "
                                    "processes, enough row groups for every rank)")
                self.epoch, self.shard, self.row_group, self.doc = self.epoch + 1, 0, self.rank, 0
            shard = self.shards[self.shard]
            if self.row_group >= len(shard.row_group_rows):
                self.shard, self.row_group, self.doc, self._texts = self.shard + 1, self.rank, 0, None
                continue
            if self._texts is None:
                if self._reader is None or self._reader[0] != self.shard:
                    self._reader = (self.shard, shard.reader())
                self._texts = self._reader[1](self.row_group)
            if self.doc >= len(self._texts):
                self.row_group, self.doc, self._texts = self.row_group + self.world, 0, None
                continue
            batch = self._texts[self.doc:self.doc + self.batch_docs]
            self.doc += len(batch)
            self._wraps_without_docs = 0
            return batch


class PretrainLoader:
    """Infinite iterator of ``(inputs, targets)`` LongTensors ``[batch_size, seq_len]``; see the module docstring."""

    def __init__(self, source: DataSource, tokenizer, *, batch_size: int, seq_len: int, split: str = "train",
                 rank: int = 0, world_size: int = 1, tokenizer_batch_size: int = 128, buffer_size: int = 1000):
        for key, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size),
                           ("tokenizer_batch_size", tokenizer_batch_size), ("buffer_size", buffer_size)):
            if int(value) < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        shards = source.shards(split)
        if not any(sum(s.row_group_rows[rank::world_size]) for s in shards):
            groups = sum(len(s.row_group_rows) for s in shards)
            raise DataError(f"{source.name}: rank {rank} of {world_size} gets no {split} documents (row groups "
                            f"{rank}, {rank}+{world_size}, … of {len(shards)} shard(s) with {groups} row groups in "
                            "all, some empty)", "use fewer processes or data with more row groups per shard")
        self.source, self.tokenizer, self.split = source, tokenizer, split
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.buffer_size = buffer_size
        self.bos = special_token_id(tokenizer, BOS_TOKEN)
        self._stream = _DocStream(shards, rank, world_size, tokenizer_batch_size)
        self._docs: list[np.ndarray] = []  # tokenized docs in arrival order (nanochat's doc_buffer)
        self._lens = np.zeros(0, dtype=np.int64)  # their lengths, for the vectorised best-fit search
        self.batches_yielded = 0

    def __iter__(self):
        return self

    def _refill(self) -> None:
        ids = encode_ordinary(self.tokenizer, self._stream.next_batch())
        docs = []
        for doc_ids in ids:
            doc = np.empty(len(doc_ids) + 1, dtype=np.int32)
            doc[0] = self.bos
            doc[1:] = doc_ids
            docs.append(doc)
        self._append(docs)

    def _append(self, docs: list[np.ndarray]) -> None:
        self._docs.extend(docs)
        self._lens = np.concatenate([self._lens, np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))])

    def _take(self, i: int) -> np.ndarray:
        self._lens = np.delete(self._lens, i)
        return self._docs.pop(i)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        capacity = self.seq_len + 1
        rows = np.empty((self.batch_size, capacity), dtype=np.int64)
        for row in rows:
            pos = 0
            while pos < capacity:
                while len(self._docs) < self.buffer_size:
                    self._refill()
                remaining = capacity - pos
                fitting = np.where(self._lens <= remaining, self._lens, 0)
                best = int(fitting.argmax())  # argmax/argmin return the first extremum: nanochat's tie-breaking
                if fitting[best] > 0:
                    doc = self._take(best)
                else:  # nothing fits: crop the shortest doc to fill the row exactly, drop its rest
                    doc = self._take(int(self._lens.argmin()))[:remaining]
                row[pos:pos + len(doc)] = doc
                pos += len(doc)
        self.batches_yielded += 1
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous()

    # -- exact resume ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        tokens = np.concatenate(self._docs) if self._docs else np.zeros(0, dtype=np.int32)
        return {"format": STATE_FORMAT, "split": self.split, "rank": self.rank, "world_size": self.world_size,
                "bos_token_id": self.bos, "vocab_size": len(self.tokenizer), "batches_yielded": self.batches_yielded,
                "cursor": self._stream.cursor, "buffer_lengths": torch.from_numpy(self._lens.copy()),
                "buffer_tokens": torch.from_numpy(tokens)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a PretrainLoader state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        mine = {"split": self.split, "rank": self.rank, "world_size": self.world_size, "bos_token_id": self.bos,
                "vocab_size": len(self.tokenizer)}
        wrong = {k: (state[k], v) for k, v in mine.items() if state[k] != v}
        if wrong:
            raise ValueError("loader state does not belong to this loader (saved, now): "
                             + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in wrong.items())
                             + ". Each rank must load its own state, with the same split, world size and tokenizer")
        self._stream.seek(state["cursor"])
        lens = state["buffer_lengths"].cpu().numpy().astype(np.int64)
        tokens = state["buffer_tokens"].cpu().numpy().astype(np.int32)
        self._docs, self._lens = [], np.zeros(0, dtype=np.int64)
        self._append(np.split(tokens, np.cumsum(lens)[:-1]) if len(lens) else [])
        self.batches_yielded = state["batches_yielded"]


# ----------------------------------------------------------------------------------------------------------------
# CLI: download shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_nanochat.data.loader",
        description="Download pretraining shards, as nanochat's `python -m nanochat.dataset -n N`: train shards "
                    "0..N-1 plus the validation shard (the dataset's last). Other --data values (a Hub dataset id, "
                    "local files) are loaded once through `datasets`, which caches them, and summarised.")
    parser.add_argument("--data", default="climbmix",
                        help=f"{' | '.join(PRESETS)} (default climbmix), or any other pretraining --data value")
    parser.add_argument("-n", "--num-shards", type=int, default=None,
                        help="presets: number of train shards to fetch (-1 = all). ~170 suffice for nanochat's d24")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads (default 4)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the shards go (default: nanochat's $NANOCHAT_BASE_DIR or ~/.cache/nanochat, "
                             "then base_data_climbmix / base_data, so existing nanochat downloads are reused)")
    args = parser.parse_args(argv)
    if args.data in PRESETS and args.num_shards is None:
        parser.error(f"--data {args.data} needs -n N (train shards to download; -1 = all)")
    if args.data not in PRESETS and args.num_shards is not None:
        parser.error("-n only applies to the presets " + ", ".join(PRESETS))
    try:
        if args.data in PRESETS:
            folder = download_preset(args.data, args.num_shards, args.cache_dir, args.workers)
            print(resolve_data(args.data, cache_dir=folder, download=False))
        else:
            print(resolve_data(args.data, cache_dir=args.cache_dir))
    except (OSError, ValueError, RuntimeError) as e:  # ConnectionError and FileNotFoundError are OSErrors
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
