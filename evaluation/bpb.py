"""Bits per byte (NANOCHAT_REFERENCE.md §6.2): a loss that does not depend on the tokenizer's vocabulary.

Sum the per-token cross-entropy (nats) over targets and divide by the number of UTF-8 bytes those targets stand for,
times ln 2. `token_bytes[id]` is a token's byte length, 0 for special tokens, so specials (the BOS that starts every
packed document) count in neither sum; targets < 0 (ignored positions) count nowhere either. Sums are all-reduced
over ranks, so every rank returns the same number.

    python -m evaluation.bpb --model DIR [--data climbmix|DIR|FILE] [--split val] [--tokens N]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from modeling_nanochat.distributed import rank_world


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


def main(argv=None):
    from modeling_nanochat.pretrain_data import PretrainLoader, resolve_data
    from modeling_nanochat.tokenization import load_token_bytes, load_tokenizer
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description="Bits per byte of a causal LM on a text split (packed like pretraining).")
    ap.add_argument("--model", required=True, help="HF model dir (ours or any causal LM with a nanochat tokenizer)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model dir)")
    ap.add_argument("--data", default=None, help="climbmix (default), fineweb-edu, a dir of parquet shards, a "
                                                 "jsonl/txt/parquet file or a Hub dataset id")
    ap.add_argument("--split", default="val", choices=["train", "val"])
    ap.add_argument("--tokens", type=int, default=2**20, help="tokens to score (rounded down to whole batches)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per forward")
    ap.add_argument("--seq-len", type=int, default=None, help="row length (default: the model's training context)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).to(device).eval()
    tok_dir = args.tokenizer or args.model
    tokenizer = load_tokenizer(tok_dir)
    try:
        token_bytes = load_token_bytes(tok_dir)
    except FileNotFoundError:  # a tokenizer saved by someone else: derive the byte lengths from it
        from modeling_nanochat.tokenization import compute_token_bytes
        token_bytes = compute_token_bytes(tokenizer)
    seq_len = args.seq_len or model.config.max_position_embeddings
    steps = max(1, args.tokens // (args.batch_size * seq_len))
    loader = PretrainLoader(resolve_data(args.data), tokenizer, batch_size=args.batch_size, seq_len=seq_len,
                            split=args.split)
    bpb = evaluate_bpb(model, loader, steps, token_bytes)
    print(f"{args.split} bpb: {bpb:.6f} ({steps * args.batch_size * seq_len:,} tokens)")
    return bpb


if __name__ == "__main__":
    main()
