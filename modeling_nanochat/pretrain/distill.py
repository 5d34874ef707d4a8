"""Knowledge distillation as a pretraining objective: the student (the run's model, sized by the depth dial) learns
from a frozen teacher's next-token distribution as well as from the text.

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, text)

with both distributions softened by the temperature T (Hinton et al. 2015: the T^2 keeps the soft term's gradient
scale independent of T). It is forward KL, averaged over the target positions the hard loss counts. Everything else
is pretraining's: MuonAdamW, the dial's schedules, checkpoints and step-exact resume (`recipes/distill.py` is
`recipes/pretrain.py --teacher`). The logits compared are the ones each model is trained and sampled with: fp32,
softcapped, the padded vocabulary columns already dropped by the model's forward.
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.nn.functional as F

from modeling_nanochat.utils.errors import NanochatError


class TeacherError(NanochatError):
    """A teacher that cannot teach this student (another tokenizer, a missing dir)."""


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                      temperature: float, alpha: float, hard_loss: torch.Tensor | None = None,
                      ignore_index: int = -100) -> tuple[torch.Tensor, dict]:
    """(mixed loss, {"kd": soft term, "ce": hard term}) for logits [B, T, V] and targets [B, T] (already shifted:
    position t predicts targets[:, t]). `hard_loss`: the student's own cross-entropy when the model computed it
    already (the same value `F.cross_entropy` would give here). Positions whose target is negative or
    `ignore_index` count in neither term."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the two models need the same vocabulary")
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"temperature must be > 0 and alpha in [0, 1], got {temperature}, {alpha}")
    v = student_logits.size(-1)
    s = student_logits.reshape(-1, v).float()
    t = teacher_logits.reshape(-1, v).float()
    y = targets.reshape(-1)
    valid = (y >= 0) & (y != ignore_index)
    n = valid.sum().clamp(min=1)
    if hard_loss is None:
        hard_loss = F.cross_entropy(s, torch.where(valid, y, 0), reduction="none").mul(valid).sum() / n
    if alpha == 0.0:
        return hard_loss, {"kd": torch.zeros_like(hard_loss), "ce": hard_loss.detach()}
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # KL(teacher || student) per position
    kd = (kl * valid).sum() / n * temperature ** 2
    loss = alpha * kd + (1.0 - alpha) * hard_loss
    return loss, {"kd": kd.detach(), "ce": hard_loss.detach()}


def tokenizer_fingerprint(directory: str) -> str | None:
    """sha256 of a model dir's tokenizer.json (None if it has none): two models share ids iff these agree."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_teacher(directory: str, *, student_config, tokenizer_dir: str | None, device, dtype=None):
    """The teacher model, frozen and in eval mode on `device`, after checking that it speaks the student's
    vocabulary (same size, same special ids and, where both dirs have one, the same tokenizer.json)."""
    from modeling_nanochat.checkpoints.model_dirs import load_model

    model = load_model(directory)
    c = model.config
    for name in ("vocab_size", "bos_token_id", "eos_token_id"):
        if getattr(c, name, None) != getattr(student_config, name, None):
            raise TeacherError(f"--teacher {directory}: its {name} is {getattr(c, name, None)} but the student's is "
                               f"{getattr(student_config, name, None)}: the two models use different tokenizers",
                               "distill from a teacher trained with this --tokenizer (or pass the teacher's "
                               "tokenizer dir as --tokenizer)")
    mine, theirs = tokenizer_fingerprint(tokenizer_dir or ""), tokenizer_fingerprint(directory)
    if mine is not None and theirs is not None and mine != theirs:
        raise TeacherError(f"--teacher {directory}: its tokenizer.json differs from {tokenizer_dir}'s: the same "
                           "ids would mean different text", "pass the teacher's tokenizer as --tokenizer")
    model.requires_grad_(False)
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
