"""nanochat's one dial for training: depth -> token budget, batch size, learning rates, weight decay, schedules.

NANOCHAT_REFERENCE.md §2. The model sizes come from `NanoChatConfig(depth=N)`; everything a training run needs on
top of that is derived here from the parameter counts, with d12 as the reference where nanochat tuned things:

* horizon: `target_tokens = ratio * N` with N = block matrices + lm_head ("scaling params", cleanest scaling laws);
  `num_iterations` = explicit > from `target_flops` > from the ratio.
* batch: Power Lines, `B = 2^round(log2(2^19 * (target_tokens / D_ref)^0.383))`, D_ref = ratio * N(d12).
* LRs: the CLI LRs times `sqrt(B / 2^19)` (the AdamW ones are further scaled by `(d/768)^-0.5` inside
  `optim.build_param_groups`); Muon weight decay `0.28 * sqrt(B / B_ref) * (D_ref / target_tokens)`.
* schedules per optimizer step: LR warmup/constant/linear warmdown, Muon momentum 0.85->0.97->0.90, Muon weight
  decay cosine to zero.

Parameter counts are taken from the real module tree built on the meta device (no memory), so they follow the
architecture switches of the config instead of a closed form that could drift from the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

# The architecture facts (parameter roles, depth-independent config fields) come from the one module that derives
# them from the model, instead of lists kept here; config_at_depth stays importable from this module.
from modeling_nanochat.checkpoints.architecture import (BLOCK, EMBEDDING, LM_HEAD, VALUE_EMBEDS, config_at_depth,
                                                         meta_model, parameter_roles)
from modeling_nanochat.optim.schedules import (pretrain_lr_multiplier, pretrain_muon_momentum,
                                                 pretrain_muon_weight_decay)
from modeling_nanochat.utils.errors import NanochatError

B_REF = 2**19  # tokens per step nanochat found best at d12
REFERENCE_DEPTH = 12
POWER_LINES_EXPONENT = 0.383  # B_opt ∝ D^0.383 (arXiv:2505.13738)


def parameter_counts(config) -> dict[str, int]:
    """nanochat's `num_scaling_params` groups plus `matmul` (weights of every Linear: what FLOPs are counted on)."""
    model = meta_model(config)
    counts = dict(wte=0, value_embeds=0, lm_head=0, transformer_matrices=0, scalars=0)
    # roles from the module tree (checkpoints.architecture); every other role (lambdas, smear gate and its lambda,
    # backout lambda) counts as a scalar
    count_of = {EMBEDDING: "wte", VALUE_EMBEDS: "value_embeds", LM_HEAD: "lm_head", BLOCK: "transformer_matrices"}
    roles = parameter_roles(model)
    for name, p in model.named_parameters():
        counts[count_of.get(roles[name], "scalars")] += p.numel()
    counts["total"] = sum(counts.values())
    counts["matmul"] = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return counts


def num_scaling_params(config) -> int:
    c = parameter_counts(config)
    return c["transformer_matrices"] + c["lm_head"]


def flops_per_token(config, counts: dict | None = None) -> int:
    """Training FLOPs per token (forward + backward), nanochat's `estimate_flops`: 6 per matmul weight plus the
    attention score/value matmuls over each layer's effective context `min(window, T)`."""
    counts = counts or parameter_counts(config)
    t, h, hd = config.max_position_embeddings, config.num_attention_heads, config.head_dim
    attn = 0
    for i in range(config.num_hidden_layers):
        w = config.layer_window(i)
        attn += 12 * h * hd * (t if w < 0 else min(w, t))
    return 6 * counts["matmul"] + attn


@dataclass
class TrainingPlan:
    """Every number a pretraining run derives from the dial (what `pretrain.py` prints and saves as plan.json)."""

    depth: int
    max_seq_len: int
    vocab_size: int
    world_size: int
    device_batch_size: int
    param_counts: dict
    num_scaling_params: int
    flops_per_token: int
    target_param_data_ratio: float
    target_tokens: int
    total_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    horizon_source: str  # "num_iterations", "target_flops" or "param_data_ratio"
    batch_lr_scale: float
    embedding_lr: float
    unembedding_lr: float
    matrix_lr: float
    scalar_lr: float
    weight_decay: float  # Muon's, after scaling; AdamW groups have fixed decays (optim.build_param_groups)
    warmup_steps: int
    warmdown_ratio: float
    final_lr_frac: float
    derived: dict = field(default_factory=dict)  # intermediate numbers, for the record

    @property
    def warmdown_steps(self) -> int:
        return round(self.warmdown_ratio * self.num_iterations)

    @property
    def total_tokens(self) -> int:
        return self.total_batch_size * self.num_iterations

    def lr_multiplier(self, it: int) -> float:
        return pretrain_lr_multiplier(it, self.num_iterations, self.warmup_steps, self.warmdown_steps,
                                      self.final_lr_frac)

    def muon_momentum(self, it: int) -> float:
        return pretrain_muon_momentum(it, self.num_iterations, self.warmdown_steps)

    def muon_weight_decay(self, it: int) -> float:
        return pretrain_muon_weight_decay(it, self.num_iterations, self.weight_decay)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(warmdown_steps=self.warmdown_steps, total_tokens=self.total_tokens,
                 total_flops=self.flops_per_token * self.total_tokens)
        return d


class PlanError(NanochatError):
    """An impossible combination of training settings, found before any compute."""


def plan_training(config, *, world_size: int = 1, device_batch_size: int = 32, target_param_data_ratio: float = 12,
                  total_batch_size: int = -1, num_iterations: int = -1, target_flops: float = -1.0,
                  embedding_lr: float = 0.3, unembedding_lr: float = 0.008, matrix_lr: float = 0.02,
                  scalar_lr: float = 0.5, weight_decay: float = 0.28, warmup_steps: int = 40,
                  warmdown_ratio: float = 0.65, final_lr_frac: float = 0.05) -> TrainingPlan:
    """nanochat base_train's derivation (§2.2-2.5) for `config`, `world_size` processes and `device_batch_size` rows
    of `config.max_position_embeddings` tokens per micro-step. -1 means "derive it"."""
    T = config.max_position_embeddings
    if device_batch_size < 1 or world_size < 1:
        raise PlanError(f"device_batch_size ({device_batch_size}) and world_size ({world_size}) must be >= 1")
    if num_iterations <= 0 and target_flops <= 0 and target_param_data_ratio <= 0:
        raise PlanError("no training horizon: give --num-iterations, --target-flops or --target-param-data-ratio > 0")
    if not 0 <= warmdown_ratio <= 1:
        raise PlanError(f"--warmdown-ratio must be in [0, 1], got {warmdown_ratio}")

    counts = parameter_counts(config)
    n_scaling = counts["transformer_matrices"] + counts["lm_head"]
    fpt = flops_per_token(config, counts)
    # the ratio is still needed for the batch-size and weight-decay rules when the horizon comes from elsewhere;
    # nanochat then uses whatever --target-param-data-ratio says (12 by default)
    ratio = target_param_data_ratio if target_param_data_ratio > 0 else 12.0
    target_tokens = int(ratio * n_scaling)
    d_ref = ratio * num_scaling_params(config_at_depth(config, REFERENCE_DEPTH))

    derived = {}
    if total_batch_size == -1:
        predicted = B_REF * (target_tokens / d_ref) ** POWER_LINES_EXPONENT
        total_batch_size = 2 ** round(math.log2(predicted))
        derived["predicted_batch_size"] = predicted
    if total_batch_size < 1:
        raise PlanError(f"--total-batch-size must be positive or -1 (auto), got {total_batch_size}")
    per_micro = device_batch_size * T * world_size
    if total_batch_size % per_micro:
        fits = [b for b in (64, 32, 16, 8, 4, 2, 1) if b <= device_batch_size and total_batch_size % (b * T * world_size) == 0]
        hint = (f"use --device-batch-size {fits[0]}" if fits else
                f"pick --total-batch-size as a multiple of {T * world_size} (max_seq_len x world size)")
        raise PlanError(
            f"total batch size {total_batch_size:,} tokens is not a multiple of device_batch_size x max_seq_len x "
            f"world_size = {device_batch_size} x {T} x {world_size} = {per_micro:,}, so gradient accumulation would "
            f"not be whole: {hint}, or set --total-batch-size")
    grad_accum = total_batch_size // per_micro

    if num_iterations > 0:
        source = "num_iterations"
    elif target_flops > 0:
        num_iterations, source = round(target_flops / (fpt * total_batch_size)), "target_flops"
    else:
        num_iterations, source = target_tokens // total_batch_size, "param_data_ratio"
    if num_iterations < 1:
        raise PlanError(f"the horizon ({source}) gives {num_iterations} optimizer steps at {total_batch_size:,} "
                        "tokens per step; raise it or lower --total-batch-size")

    batch_lr_scale = (total_batch_size / B_REF) ** 0.5  # AdamW-style sqrt scaling, used for Muon too
    wd_scaled = weight_decay * math.sqrt(total_batch_size / B_REF) * (d_ref / target_tokens)
    derived.update(d_ref_tokens=d_ref, b_ref=B_REF)
    return TrainingPlan(
        depth=config.num_hidden_layers, max_seq_len=T, vocab_size=config.vocab_size, world_size=world_size,
        device_batch_size=device_batch_size, param_counts=counts, num_scaling_params=n_scaling, flops_per_token=fpt,
        target_param_data_ratio=target_param_data_ratio, target_tokens=target_tokens,
        total_batch_size=total_batch_size, grad_accum_steps=grad_accum, num_iterations=num_iterations,
        horizon_source=source, batch_lr_scale=batch_lr_scale, embedding_lr=embedding_lr * batch_lr_scale,
        unembedding_lr=unembedding_lr * batch_lr_scale, matrix_lr=matrix_lr * batch_lr_scale,
        scalar_lr=scalar_lr * batch_lr_scale, weight_decay=wd_scaled, warmup_steps=warmup_steps,
        warmdown_ratio=warmdown_ratio, final_lr_frac=final_lr_frac, derived=derived)


# Peak dense bf16 tensor FLOP/s by device name (first match wins, so specific names come first). Vendor datasheet
# numbers, the same ones nanochat's MFU uses, so MFUs are comparable.
PEAK_BF16_FLOPS = (
    (("gb200",), 2.5e15), (("b200",), 2.25e15), (("b100",), 1.8e15),
    (("h200", "nvl"), 836e12), (("h200", "pcie"), 836e12), (("h200",), 989e12),
    (("h100", "nvl"), 835e12), (("h100", "pcie"), 756e12), (("h100",), 989e12),
    (("h800", "nvl"), 989e12), (("h800",), 756e12),
    (("a100",), 312e12), (("a800",), 312e12), (("a40",), 149.7e12), (("a30",), 165e12),
    (("l40s",), 362e12), (("l4",), 121e12),
    (("mi355",), 2.5e15), (("mi325",), 1.3074e15), (("mi300x",), 1.3074e15), (("mi250x",), 383e12),
    (("5090",), 209.5e12), (("4090",), 165.2e12), (("3090",), 71e12),
)


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Peak bf16 FLOP/s of a CUDA device, or None when unknown (CPU/MPS: MFU is not meaningful there)."""
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device).lower()
    for keys, flops in PEAK_BF16_FLOPS:
        if all(k in name for k in keys):
            return flops
    return None


__all__ = ["TrainingPlan", "PlanError", "plan_training", "parameter_counts", "num_scaling_params", "flops_per_token",
           "config_at_depth", "peak_flops", "B_REF"]
