"""nanochat's RL (chat_rl.py, NANOCHAT_REFERENCE §7) on TRL's GRPOTrainer.

nanochat's "GRPO" is on-policy REINFORCE with a group baseline: no KL, no reference model, no PPO ratio, advantage
``r - mean(r)`` over the samples of one question, token-level loss normalisation. In GRPOConfig terms that is
``beta=0.0, num_iterations=1, scale_rewards="none"`` (with ``num_iterations=1`` and one optimizer step per generation
batch the ratio is exactly 1, so PPO clipping never acts and the gradient is ``-A * grad log p``), plus:

* ``NanoChatGRPOTrainer``: GRPOTrainer with the tool-use rollout (rollout.ToolRollout) as ``rollout_func``,
  nanochat's MuonAdamW (optim.trainer_mixin's Trainer hooks) with the RL learning rates x 0.05 decaying linearly to 0
  (``rl_muon_setup``), and log-probs over the real vocabulary only (below).
* ``gsm8k_prompt_dataset``: GSM8K as TRL prompts (``prompt`` + ``answer``) in nanochat's order.

Loss normalisation. nanochat sums ``logp * A`` over the valid tokens of each forward pass of ``device_batch_size``
(8) sequences, divides by that pass's number of valid tokens, and averages the passes (over passes, examples and
ranks). TRL's ``loss_type="bnpo"`` is the same formula — per micro-batch ``sum(loss * mask) / sum(mask)``, divided
by the accumulation steps, averaged over processes — with ``per_device_train_batch_size`` = nanochat's
``device_batch_size``. The one difference: TRL shuffles the generation batch before cutting it into micro-batches,
so a micro-batch mixes samples of different questions where nanochat's pass holds 8 samples of one question; each
token's weight is then ``A / (valid tokens of its micro-batch)`` rather than ``/ (valid tokens of its pass)``.
``loss_type="dapo"`` (TRL's default) would normalise by all valid tokens of the whole step instead: the same when
every pass has the same number of valid tokens, otherwise a different weighting of long and short passes.

Other differences from nanochat, on purpose or forced:
* log-probs are computed at the sampling ``temperature`` (TRL divides the logits by it); nanochat's loss uses
  the raw logits. Equal at nanochat's temperature 1.0.
* like nanochat, sampling uses top-k 50 while the loss uses the full softmax.
* prompts of a batch are left-padded (TRL pads), so RoPE positions are shifted per row; attention is relative, so
  log-probs agree with an unpadded forward to float rounding (tests/rl/test_grpo.py checks 1e-5).
* sampling seeds, see rl/rollout.py.
"""

from __future__ import annotations

import functools
import types

import torch
from trl import GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from modeling_nanochat.generation.calculator import use_calculator
from modeling_nanochat.rl.rollout import ToolRollout
from modeling_nanochat.tokenizer.tokenizer import save_tokenizer
from modeling_nanochat.optim.schedules import rl_lr_schedule
from modeling_nanochat.optim.trainer_mixin import MuonAdamWSetup, MuonAdamWTrainerMixin, nanochat_param_groups


def rl_muon_setup(*, init_lr_frac: float = 0.05, unembedding_lr: float = 0.004, embedding_lr: float = 0.2,
                  matrix_lr: float = 0.02, scalar_lr: float = 0.5, weight_decay: float = 0.0,
                  **setup_kwargs) -> MuonAdamWSetup:
    """chat_rl's optimizer: MuonAdamW over nanochat's groups at its RL learning rates (``setup_optimizer``'s function
    defaults, AdamW ones scaled by (d/768)^-0.5), every LR times ``init_lr_frac``, decaying linearly to 0 over the
    run; Muon momentum fixed at 0.95, Muon weight decay ``weight_decay`` (AdamW groups keep nanochat's fixed values).
    ``setup_kwargs`` go to ``MuonAdamWSetup`` (e.g. ``shard_optimizer``, ``compile``)."""
    groups = functools.partial(nanochat_param_groups, unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                               matrix_lr=matrix_lr, scalar_lr=scalar_lr, weight_decay=weight_decay,
                               init_lr_frac=init_lr_frac)
    return MuonAdamWSetup(param_groups=groups, lr_schedule=rl_lr_schedule, **setup_kwargs)


class NanoChatGRPOTrainer(MuonAdamWTrainerMixin, GRPOTrainer):
    """GRPOTrainer with nanochat's tool-use sampling and optimizer. Extra keyword arguments:

    Args:
        calculator: tool for the default rollout (``None``: sample without tools); unused with a ``rollout_func``.
        rollout_rows: rows per sampling pass of the default rollout, questions mixed (``ToolRollout(rows_per_pass=)``);
            None: nanochat's passes, one question each.
        muon_setup: the optimizer (default ``rl_muon_setup()``; see optim.trainer_mixin). GRPOConfig's ``learning_rate``,
            ``weight_decay`` and ``optim`` are not used by it: every MuonAdamW group has its own LR and decay.
    """

    def __init__(self, *args, rollout_func=None, calculator=use_calculator, muon_setup: MuonAdamWSetup | None = None,
                 rollout_rows: int | None = None, **kwargs):
        super().__init__(*args, rollout_func=rollout_func or ToolRollout(calculator, rows_per_pass=rollout_rows),
                         muon_setup=muon_setup or rl_muon_setup(), **kwargs)
        policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        _score_real_vocab_only(policy, self.temperature)

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Weights as Trainer writes them, the tokenizer as this project does (``save_tokenizer``: chat template in
        tokenizer_config.json, which transformers 4.x and TGI read, and token_bytes.pt for bits per byte)."""
        output_dir = output_dir or self.args.output_dir
        super()._save(output_dir, state_dict)
        save_tokenizer(self.processing_class, output_dir)


def _score_real_vocab_only(model, temperature: float) -> None:
    """TRL's fused log-prob head projects onto every row of ``lm_head``; nanochat (and our forward) crop the logits to
    the tokenizer's ``vocab_size`` first. When the head is padded (``padded_vocab_size > vocab_size``) the padded rows
    would join the softmax, so the fused path is replaced by the model's own forward + log-softmax (full logits in
    memory, as nanochat does). Unpadded heads (nanochat's 32768, any multiple of 64) keep TRL's chunked kernel."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "padded_vocab_size", None) in (None, getattr(config, "vocab_size", None)):
        return
    fused_forward = model.forward  # TRL's patched forward (calls the original when fused_lm_head is False)
    own_forward = type(model).forward

    @functools.wraps(own_forward)  # keep the signature: generate() validates model kwargs against it
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return fused_forward(*args, labels=labels, shift_labels=shift_labels,
                                 num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        logits = own_forward(self, *args, **kwargs).logits  # (B, T, vocab_size): cropped, softcapped, fp32
        if shift_labels is None:
            logits, shift_labels = logits[:, :-1], labels[:, 1:]
        mask = shift_labels != -100
        logp = torch.log_softmax(logits / temperature, dim=-1)
        log_probs = logp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        entropy = -(logp.exp() * logp).sum(-1) * mask
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   label_mask=mask)

    model.forward = types.MethodType(forward, model)
