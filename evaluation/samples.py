"""Greedy completions of a few prompts: the quick look at a base model that nanochat prints during and after
pretraining (base_train's samples, base_eval's samples)."""

from __future__ import annotations

import contextlib

import torch

SAMPLE_PROMPTS = (  # nanochat's base_train sample prompts
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts=SAMPLE_PROMPTS, *, max_new_tokens: int = 16, device=None,
                       autocast=contextlib.nullcontext) -> list[str]:
    """Each prompt after <|bos|>, continued greedily for max_new_tokens (no stop token: a base model has no turn
    end); returns prompt + continuation as text. The model's train/eval mode is restored."""
    from modeling_nanochat.tokenizer.tokenizer import encode_ordinary

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    bos = tokenizer.convert_tokens_to_ids("<|bos|>")
    out = []
    try:
        for prompt in prompts:
            ids = torch.tensor([[bos] + encode_ordinary(tokenizer, prompt)], device=device)
            with autocast():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=None, pad_token_id=bos)
            out.append(tokenizer.decode(gen[0, 1:].tolist()))
    finally:
        model.train(was_training)
    return out
