"""nanochat's chat SFT on TRL's ``SFTTrainer``: its config (nanochat's defaults) and the trainer.

``NanoChatSFTTrainer`` is SFTTrainer plus ``trainer_mixin.MuonAdamWTrainerMixin`` (nanochat's optimizer and schedules),
with these differences from stock TRL, each for nanochat parity:

* data: rows planned by ``collator.plan_epoch`` (nanochat's best-fit packing) are dealt to the ranks in order
  (sequential sampler, ``remove_unused_columns`` off for the ``conversations`` column) and turned into tensors by
  ``PackedSFTCollator``; TRL's tokenization and packing are skipped (``skip_prepare_dataset``);
* loss: the mean over the supervised tokens of each micro-batch, averaged over accumulation steps and ranks
  (nanochat), not TRL's token count over the whole step; computed from the model's own logits (cropped to the real
  vocabulary, fp32, softcapped) rather than TRL's fused head;
* evaluation (``eval_steps``, at step 0 and at the end, as nanochat's ``--eval-every``): validation bits per byte
  over ``eval_tokens`` tokens of the packed val mixture, and every ``chatcore_every`` steps ChatCORE (categorical
  tasks up to ``chatcore_max_cat`` problems, generative ones up to ``chatcore_max_sample``) via ``evaluation.chat``;
* saving: ``save_pretrained`` plus the nanochat tokenizer files (``tokenizer.save_tokenizer``: chat template,
  ``token_bytes.pt``), so the output directory is what the evaluators and the chat app read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from trl import SFTConfig, SFTTrainer

from modeling_nanochat.sft.collator import IGNORE_INDEX, PackedSFTCollator
from modeling_nanochat.optim.trainer_mixin import MuonAdamWTrainerMixin


@dataclass
class NanoChatSFTConfig(SFTConfig):
    """SFTConfig with nanochat's chat_sft defaults. ``-1`` / None means "inherit from the pretraining run" (as
    nanochat's chat_sft reads its base checkpoint's metadata), else nanochat's fallback."""

    # data
    data_dir: str | None = field(default=None, metadata={"help": "Local SFT data in the Hub formats: one folder "
                                 "per source (smoltalk/, mmlu/, gsm8k/). Default: the Hub."})
    extra_jsonl: list[str] = field(default_factory=list, metadata={"help": "Conversation JSONL files to add, each "
                                   "PATH[:epochs] (e.g. identity_conversations.jsonl:2)."})
    smoltalk_epochs: int = field(default=1, metadata={"help": "Epochs of SmolTalk in the mixture (0: leave out)."})
    mmlu_epochs: int = field(default=3, metadata={"help": "Epochs of MMLU auxiliary_train (teaches multiple choice)."})
    gsm8k_epochs: int = field(default=4, metadata={"help": "Epochs of GSM8K train (teaches math and tool use)."})
    buffer_size: int = field(default=100, metadata={"help": "Conversations in the best-fit packing buffer."})
    # batch (inherited)
    max_length: int | None = field(default=None, metadata={"help": "Tokens per row T (default: the pretraining "
                                   "run's max_seq_len)."})
    per_device_train_batch_size: int = field(default=-1, metadata={"help": "Rows per process per micro-batch "
                                             "(-1: the pretraining run's device_batch_size, else 32)."})
    total_batch_size: int = field(default=-1, metadata={"help": "Tokens per optimizer step; sets "
                                  "gradient_accumulation_steps (-1: the pretraining run's, else 524288)."})
    # optimizer (MuonAdamW; learning_rate / lr_scheduler_type / optim are not used)
    embedding_lr: float = field(default=-1.0, metadata={"help": "AdamW LR of the embedding (-1: inherit, else 0.3)."})
    unembedding_lr: float = field(default=-1.0, metadata={"help": "AdamW LR of lm_head (-1: inherit, else 0.004)."})
    matrix_lr: float = field(default=-1.0, metadata={"help": "Muon LR of the block matrices (-1: inherit, else 0.02)."})
    scalar_lr: float = field(default=0.5, metadata={"help": "AdamW LR of the residual scalars."})
    init_lr_frac: float = field(default=0.8, metadata={"help": "Every LR times this (nanochat --init-lr-frac)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of the run with a linear LR warmup."})
    warmdown_ratio: float = field(default=0.5, metadata={"help": "Share of the run with the linear LR decay."})
    final_lr_frac: float = field(default=0.0, metadata={"help": "LR multiplier at the end of the decay."})
    load_optimizer: bool = field(default=True, metadata={"help": "Warm-start MuonAdamW from the pretraining "
                                 "optimizer state when it is compatible."})
    optimizer_sharding: bool = field(default=False, metadata={"help": "nanochat's ZeRO-2-style MuonAdamW (it "
                                     "averages the gradients itself, each rank keeps a shard of the state) instead of "
                                     "DDP's all-reduce with a replicated optimizer. Same math."})
    # evaluation
    eval_tokens: int = field(default=40 * 524288, metadata={"help": "Tokens per val bits-per-byte evaluation."})
    chatcore_every: int = field(default=200, metadata={"help": "ChatCORE every N steps and at the end (-1: off)."})
    chatcore_tasks: list[str] = field(default_factory=lambda: ["arc_easy", "arc_challenge", "mmlu", "gsm8k",
                                                               "humaneval"])
    chatcore_data: str | None = field(default=None, metadata={"help": "Local ChatCORE data (evaluation.chat "
                                      "--data). Default: the Hub."})
    chatcore_max_cat: int = field(default=-1, metadata={"help": "Problems per categorical task (-1: all)."})
    chatcore_max_sample: int = field(default=24, metadata={"help": "Problems per generative task (-1: all)."})
    chatcore_max_new_tokens: int = field(default=512, metadata={"help": "Generation budget per problem."})
    # TRL / Trainer defaults changed to nanochat's
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the mixture (nanochat: 1)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping (nanochat: none)."})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias of "
                                                "activation_checkpointing."})
    activation_checkpointing: bool | None = field(default=False, metadata={"help": "Recompute activations in the "
                                                  "backward pass (nanochat: no)."})
    eval_strategy: str = field(default="steps", metadata={"help": "'steps': val bpb every eval_steps, at step 0 "
                               "(eval_on_start) and at the end; 'no': off."})
    eval_steps: float | None = field(default=200, metadata={"help": "Val bpb every N steps."})
    eval_on_start: bool = field(default=True, metadata={"help": "Val bpb before the first step (nanochat)."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoints during training (nanochat: only the "
                               "final model)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    report_to: str | list[str] = field(default="none", metadata={"help": "Trackers (tensorboard, wandb, ...)."})
    train_sampling_strategy: str = field(default="sequential", metadata={"help": "Must stay 'sequential': the "
                                         "packed rows are already in nanochat's order."})
    remove_unused_columns: bool = field(default=False)
    dataset_kwargs: dict | str | None = field(default_factory=lambda: {"skip_prepare_dataset": True})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on CUDA only; CPU is fp32)."})

    def __post_init__(self):
        if self.bf16 is None:  # TRL turns bf16 on by default, which fails on a CPU-only host (HF_NOTES §3)
            self.bf16 = torch.cuda.is_available() and not self.use_cpu
        super().__post_init__()


class NanoChatSFTTrainer(MuonAdamWTrainerMixin, SFTTrainer):
    """SFTTrainer for nanochat's SFT (see the module docstring). Extra arguments:

    Args:
        muon_setup: the optimizer setup (trainer_mixin.MuonAdamWSetup).
        val_mixture / val_plan: the rendered val mixture and its packing plan (collator.plan_stream).
        token_bytes: bytes per token id, for bits per byte.
        chatcore_tasks: loaded evaluation.tasks objects by name (empty: no ChatCORE).
    """

    loss_is_scaled_for_ga = False  # the loss is a per-micro-batch mean; Trainer divides it by the accumulation steps

    def __init__(self, *args, val_mixture=None, val_plan=None, token_bytes=None, chatcore_tasks=None, **kwargs):
        self.val_mixture, self.val_plan, self.token_bytes = val_mixture, val_plan, token_bytes
        self.chatcore_tasks = dict(chatcore_tasks or {})
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["conversations"]

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "sequential":
            raise ValueError("train_sampling_strategy must be 'sequential': the packed rows are planned in order")
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ARG002
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], position_ids=inputs.get("position_ids"), use_cache=False)
        logits = outputs.logits
        # sum / count rather than reduction="mean": a micro-batch without supervised targets gives 0, not NaN
        total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        loss = total / (labels != IGNORE_INDEX).sum().clamp(min=1)
        return (loss, outputs) if return_outputs else loss

    # -- evaluation -----------------------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:  # noqa: ARG002
        model = self.accelerator.unwrap_model(self.model)
        metrics = {}
        if self.val_plan is not None:
            metrics[f"{metric_key_prefix}_bpb"] = self.val_bpb(model)
        step, last = self.state.global_step, self.state.global_step >= self.state.max_steps
        every = self.args.chatcore_every
        if self.chatcore_tasks and every > 0 and step > 0 and (step % every == 0 or last):
            metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self.chatcore(model).items()})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def val_bpb(self, model) -> float:
        from evaluation.bpb import evaluate_bpb

        plan, rank = self.val_plan, self.args.process_index
        collate = PackedSFTCollator(self.val_mixture, self.data_collator.bos_token_id, self.data_collator.seq_len)
        rows = plan.rows[rank]
        batches = (collate(rows[k * plan.batch_size:(k + 1) * plan.batch_size])
                   for k in range(plan.micro_batches))
        was_training = model.training
        model.eval()
        try:
            return evaluate_bpb(model, ((b["input_ids"], b["labels"]) for b in batches), plan.micro_batches,
                                self.token_bytes, autocast=self.accelerator.autocast)
        finally:
            model.train(was_training)

    def chatcore(self, model) -> dict:
        from evaluation.chat import CATEGORICAL, chatcore, evaluate_task

        args, results = self.args, {}
        for name, task in self.chatcore_tasks.items():
            limit = args.chatcore_max_cat if name in CATEGORICAL else args.chatcore_max_sample
            with self.accelerator.autocast():
                results[name] = evaluate_task(task, model, self.processing_class, limit=None if limit < 0 else limit,
                                              batch_size=max(1, args.per_device_train_batch_size),
                                              max_new_tokens=args.chatcore_max_new_tokens, progress=False)
        out = {f"chatcore/{name}": r["accuracy"] for name, r in results.items()}
        for key, names in (("chatcore", tuple(results)), ("chatcore_cat", tuple(n for n in results
                                                                                 if n in CATEGORICAL))):
            if names:
                out[key] = chatcore(results, names)
        return out

    # -- saving ---------------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None):
        from modeling_nanochat.tokenizer.tokenizer import save_tokenizer

        output_dir = output_dir or self.args.output_dir
        super()._save(output_dir, state_dict)
        # the template goes into tokenizer_config.json (read by transformers 4.x and TGI), not a separate .jinja file
        save_tokenizer(self.processing_class, output_dir, self.token_bytes)


__all__ = ["NanoChatSFTConfig", "NanoChatSFTTrainer"]
