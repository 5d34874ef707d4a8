"""Bits per byte: nats over target bytes, specials and ignored targets left out of both sums."""

import math

import torch
import torch.nn.functional as F
from conftest import perturbed_model, tiny_config

from evaluation.bpb import evaluate_bpb


def test_bpb_matches_a_hand_computation():
    model = perturbed_model(tiny_config())
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 512, (2, 12), generator=g), torch.randint(0, 512, (2, 12), generator=g))
               for _ in range(3)]
    batches[1][1][0, :4] = -1  # ignored targets
    token_bytes = torch.randint(1, 5, (512,), generator=g)
    token_bytes[503:] = 0  # the 9 special tokens count nothing
    batches[2][1][1, 3] = 505  # a special target
    nats = nbytes = 0.0
    for x, y in batches[:2] + batches[2:]:
        logits = model(input_ids=x).logits
        for b in range(y.shape[0]):
            for t in range(y.shape[1]):
                tgt = int(y[b, t])
                if tgt < 0 or token_bytes[tgt] == 0:
                    continue
                nats += F.cross_entropy(logits[b, t][None], torch.tensor([tgt])).item()
                nbytes += int(token_bytes[tgt])
    got = evaluate_bpb(model, batches, 3, token_bytes)
    assert math.isclose(got, nats / (math.log(2) * nbytes), rel_tol=1e-6)
    assert evaluate_bpb(model, batches, 2, token_bytes) != got  # steps really limits the batches read


def test_no_countable_bytes_is_infinite():
    model = perturbed_model(tiny_config())
    x = torch.zeros(1, 4, dtype=torch.long)
    assert evaluate_bpb(model, [(x, x)], 1, torch.zeros(512, dtype=torch.int64)) == float("inf")
