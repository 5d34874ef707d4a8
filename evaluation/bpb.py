"""Bits per byte (NANOCHAT_REFERENCE.md §6.2): a loss that does not depend on the tokenizer's vocabulary.

Sum the per-token cross-entropy (nats) over targets and divide by the number of UTF-8 bytes those targets stand for,
times ln 2. `token_bytes[id]` is a token's byte length, 0 for special tokens, so specials (the BOS that starts every
packed document) count in neither sum; targets < 0 (ignored positions) count nowhere either. Sums are all-reduced
over ranks, so every rank returns the same number.

From the command line: `recipes/base_eval.py --no-core` (train and val bpb of a saved model).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from modeling_nanochat.utils.distributed import rank_world


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor, autocast=None) -> float:
    """bpb of `model` (any causal LM returning `.logits`) over `steps` (inputs, targets) pairs from `batches`.

    `autocast`: optional context-manager factory for the forward (e.g. bf16 on GPU); logits are scored in fp32.
    """
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device=device, dtype=torch.int64)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    it = iter(batches)
    for _ in range(steps):
        x, y = next(it)
        x, y = x.to(device), y.to(device)
        if autocast is not None:
            with autocast():
                logits = model(input_ids=x).logits
        else:
            logits = model(input_ids=x).logits
        logits = logits.float()
        y = y.reshape(-1)
        nats = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.clamp(min=0), reduction="none")
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        total_nats += (nats * (nbytes > 0)).sum(dtype=torch.float64)
        total_bytes += nbytes.sum()
    if rank_world()[1] > 1:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())


def bpb_of_split(model, tokenizer, token_bytes: torch.Tensor, source, split: str = "val", *, tokens: int = 65536,
                 batch_size: int = 16, seq_len: int | None = None, autocast=None) -> float:
    """bpb of `model` on the first `tokens` tokens of `source`'s `split` (a `resolve_data` DataSource), read by a
    fresh PretrainLoader at the model's context length: the same tokens for every model given the same tokenizer,
    which is what comparing compressed variants of one model needs."""
    from modeling_nanochat.data.loader import PretrainLoader

    seq_len = seq_len or model.config.max_position_embeddings
    rank, world = rank_world()
    steps = max(1, tokens // (batch_size * seq_len * world))
    loader = PretrainLoader(source, tokenizer, batch_size=batch_size, seq_len=seq_len, split=split, rank=rank,
                            world_size=world)
    return evaluate_bpb(model, loader, steps, token_bytes, autocast=autocast)
