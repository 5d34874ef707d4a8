"""The smear as attention: how an engine with only a paged KV cache hands each token its predecessor's embedding.

nanochat's smear mixes the previous token's normalized embedding into each position. An engine such as vLLM keeps
nothing of earlier tokens but keys and values in its paged cache, so we make the embedding a *value* of one extra
attention layer with a sliding window of 2 (the token and the one before; a window of 3 would work too) and give it
a query and key that select the previous token exactly:

    k_j = s_j * e_0,  q_t = -SMEAR_SCORE * s_t * e_0,  s = (-1)^position,  softmax scale 1
    score(t, t-1) = +SMEAR_SCORE,  score(t, t) = -SMEAR_SCORE

so the current token's softmax weight is exp(-2 * SMEAR_SCORE) = exp(-200), which is 0 in fp32 and in bf16 (same
exponent range), and the previous token's is exactly 1: the output *is* its embedding, bit for bit. The scores are
products of +-1 and a constant, exact in any float format, at any position. A sequence's first position has no
predecessor (its window holds only itself): the caller masks it by `positions > 0`, as the HF model does.
"""

import torch

SMEAR_SCORE = 100.0
SMEAR_WINDOW = 2  # keys a query sees, itself included (the engine's convention, as HF's sliding_window)


def smear_query_key(positions: torch.Tensor, num_heads: int, head_dim: int, dtype: torch.dtype):
    """(q, k), each (tokens, num_heads, head_dim), for the smear layer at these positions (any order, any batch
    layout: each token's pair depends on its own position only, so cached keys stay valid)."""
    parity = (1 - 2 * (positions % 2)).to(dtype)  # s = (-1)^position
    first = torch.zeros(head_dim, dtype=dtype, device=positions.device)
    first[0] = 1.0
    k = (parity[:, None, None] * first).expand(positions.shape[0], num_heads, head_dim)
    return -SMEAR_SCORE * k, k


__all__ = ["SMEAR_SCORE", "SMEAR_WINDOW", "smear_query_key"]
