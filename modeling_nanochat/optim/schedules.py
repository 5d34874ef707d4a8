"""*The* schedules: nanochat's per-step learning-rate multiplier, Muon momentum and Muon weight decay for each stage,
and `apply_schedule`, the one function that writes a step's values into an optimizer's param groups (pretraining's
loop, the DeepSpeed path and the TRL trainers' `NanoChatSchedule` all call it).

Param-group conventions (optim/muon_adamw.py, optim/zero.py): every group carries ``initial_lr``; ``kind == "muon"``
(or DeepSpeed's ``use_muon``) marks Muon groups; a group with ``weight_decay_scale`` (DeepSpeed's block-matrix group)
gets the scheduled Muon weight decay times that scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim.lr_scheduler import LambdaLR


def apply_schedule(param_groups, *, lr_multiplier: float, muon_momentum: float | None = None,
                   muon_weight_decay: float | None = None) -> None:
    """``lr = initial_lr * lr_multiplier`` for every group; Muon groups get ``muon_momentum`` and Muon (or
    ``weight_decay_scale``) groups ``muon_weight_decay * weight_decay_scale`` (scale 1 by default). None leaves a
    value as the groups have it; the AdamW weight decays stay fixed, as in nanochat."""
    for group in param_groups:
        group["lr"] = group["initial_lr"] * lr_multiplier
        muon = group.get("kind") == "muon" or group.get("use_muon", False)
        if muon and muon_momentum is not None:
            group["momentum"] = muon_momentum
        if muon_weight_decay is not None and (muon or "weight_decay_scale" in group):
            group["weight_decay"] = muon_weight_decay * group.get("weight_decay_scale", 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining (nanochat's base_train): the plan (optim/scaling.py) supplies the horizon


def pretrain_lr_multiplier(it: int, num_iterations: int, warmup_steps: int, warmdown_steps: int,
                           final_lr_frac: float) -> float:
    """Linear warmup, constant, then linear warmdown to `final_lr_frac` (nanochat's get_lr_multiplier)."""
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= num_iterations - warmdown_steps:
        return 1.0
    progress = (num_iterations - it) / warmdown_steps
    return progress + (1 - progress) * final_lr_frac


def pretrain_muon_momentum(it: int, num_iterations: int, warmdown_steps: int) -> float:
    """0.85 -> 0.97 over the first 400 steps, 0.97 -> 0.90 over the warmdown. The warmup branch is checked first,
    so runs shorter than ~1000 steps jump at step 400, exactly as nanochat does."""
    start = num_iterations - warmdown_steps
    if it < 400:
        frac = it / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if it >= start:
        progress = (it - start) / warmdown_steps
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def pretrain_muon_weight_decay(it: int, num_iterations: int, weight_decay: float) -> float:
    """Cosine from the scaled decay to zero over the run."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


# ---------------------------------------------------------------------------------------------------------------------
# Chat stages (nanochat's chat_sft / chat_rl), as ``(step, num_steps) -> multiplier`` for `NanoChatSchedule`

# nanochat's chat_sft.py: LRs constant to 50% of the run, then linear to 0; Muon momentum 0.85 -> 0.95 over 300 steps
SFT_WARMUP_RATIO = 0.0
SFT_WARMDOWN_RATIO = 0.5
SFT_FINAL_LR_FRAC = 0.0
MOMENTUM_WARMUP_STEPS = 300


def sft_lr_multiplier(progress: float, warmup_ratio: float = SFT_WARMUP_RATIO,
                      warmdown_ratio: float = SFT_WARMDOWN_RATIO, final_lr_frac: float = SFT_FINAL_LR_FRAC) -> float:
    """nanochat's chat_sft LR multiplier at ``progress`` in [0, 1]: linear warmup, constant, linear warmdown."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - warmdown_ratio)) / warmdown_ratio
    return (1 - decay) * 1.0 + decay * final_lr_frac


def sft_lr_schedule(warmup_ratio: float = SFT_WARMUP_RATIO, warmdown_ratio: float = SFT_WARMDOWN_RATIO,
                    final_lr_frac: float = SFT_FINAL_LR_FRAC) -> Callable[[int, int], float]:
    """``(step, num_steps) -> multiplier`` with progress = (step + 1) / num_steps: the share of the run done once this
    step is taken. nanochat measures progress as conversations consumed / dataset size right after fetching the
    step's data, which is the same up to packing granularity; the last step runs at ``final_lr_frac`` as there."""
    def schedule(step: int, num_steps: int) -> float:
        return sft_lr_multiplier(min(1.0, (step + 1) / max(1, num_steps)), warmup_ratio, warmdown_ratio,
                                 final_lr_frac)
    return schedule


def sft_muon_momentum(step: int) -> float:
    """nanochat's chat_sft Muon momentum: 0.85 -> 0.95 linearly over the first 300 steps, then 0.95."""
    frac = min(step / MOMENTUM_WARMUP_STEPS, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def rl_lr_schedule(step: int, num_steps: int) -> float:
    """nanochat's chat_rl LR multiplier: linear decay from 1 to 0 over the run (Muon momentum stays 0.95)."""
    return 1.0 - step / max(1, num_steps)


def constant_schedule(step: int, num_steps: int) -> float:  # noqa: ARG001 - the schedule signature
    return 1.0


class NanoChatSchedule(LambdaLR):
    """LR ``initial_lr * lr_schedule(step, num_steps)`` for every group, plus the Muon momentum ``muon_momentum(step)``
    written into every ``kind="muon"`` group (None: momentum left as the groups have it)."""

    def __init__(self, optimizer, num_training_steps: int, lr_schedule: Callable[[int, int], float] = constant_schedule,
                 muon_momentum: Callable[[int], float] | None = None):
        self.num_training_steps = num_training_steps
        self.muon_momentum = muon_momentum  # set before LambdaLR's init, which takes the first step
        super().__init__(optimizer, lambda step: lr_schedule(step, num_training_steps))

    def step(self, epoch=None):  # noqa: ARG002 - torch's signature; epoch is deprecated there
        super().step()  # torch's bookkeeping (step counts, get_last_lr for Trainer's logs); then the values, from
        # the same multiplier (the lr written again is the same number: initial_lr * multiplier)
        momentum = None if self.muon_momentum is None else self.muon_momentum(self.last_epoch)
        apply_schedule(self.optimizer.param_groups, lr_multiplier=self.lr_lambdas[0](self.last_epoch),
                       muon_momentum=momentum)

    def state_dict(self) -> dict:
        # plain values only (Trainer reloads scheduler.pt with weights_only=True); the functions come from the setup
        return {k: v for k, v in super().state_dict().items() if k not in ("muon_momentum", "lr_lambdas")}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)})
