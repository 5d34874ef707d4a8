"""Chat RL on GSM8K: nanochat's chat_rl (on-policy REINFORCE with a group baseline, §7) on TRL's GRPOTrainer, with
the calculator tool during sampling and nanochat's MuonAdamW.

    accelerate launch recipes/grpo.py --config recipes/grpo/default.yaml --model_name_or_path runs/sft
    python recipes/grpo.py --config recipes/grpo/tiny_cpu.yaml --model_name_or_path DIR --output_dir OUT

Every YAML key is a flag (flags override the YAML): GRPOConfig / TrainingArguments fields, ModelConfig's
(``model_name_or_path``, ``dtype``) and the nanochat ones below. The model directory is any checkpoint this project
writes (HF format, with its tokenizer); the result is written the same way to ``output_dir``.

SIGTERM or Ctrl-C: the current step finishes, ``OUTPUT/checkpoint-N`` is saved and the run exits with 128 + signum;
the same command plus ``--resume_from_checkpoint OUTPUT/checkpoint-N`` continues it.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_nanochat.utils.errors import NanochatError, cli_main  # noqa: E402 - after the path line above


@dataclass
class NanoChatRLArguments:
    prompts: str = field(default="gsm8k", metadata={
        "help": "the prompt dataset by name (modeling_nanochat/rl/prompts.py); data/eval_data point it at local files"})
    data: str | None = field(default=None, metadata={
        "help": "GSM8K train problems: a local .jsonl/.json/.parquet file or folder in openai/gsm8k's format "
                "(question, answer); default: openai/gsm8k (main) from the Hub"})
    eval_data: str | None = field(default=None, metadata={
        "help": "GSM8K test problems for eval_strategy != 'no' (same formats); default: openai/gsm8k test"})
    eval_examples: int = field(default=400, metadata={"help": "evaluate on the first N test problems (nanochat: 400)"})
    examples_per_step: int | None = field(default=16, metadata={
        "help": "questions per optimizer step over all processes (nanochat's --examples-per-step); sets "
                "gradient_accumulation_steps = examples_per_step * num_generations / (per_device_train_batch_size "
                "* processes). Set it to null to use gradient_accumulation_steps as given"})
    init_lr_frac: float = field(default=0.05, metadata={"help": "every MuonAdamW LR x this (nanochat: 0.05)"})
    unembedding_lr: float = field(default=0.004, metadata={"help": "AdamW LR of lm_head (x (d/768)^-0.5)"})
    embedding_lr: float = field(default=0.2, metadata={"help": "AdamW LR of the embeddings (x (d/768)^-0.5)"})
    matrix_lr: float = field(default=0.02, metadata={"help": "Muon LR of the block matrices"})
    scalar_lr: float = field(default=0.5, metadata={"help": "AdamW LR of the residual scalars"})
    calculator: bool = field(default=True, metadata={"help": "run the calculator tool during sampling"})
    rollout_rows: int | None = field(default=None, metadata={
        "help": "rows per sampling pass, questions mixed in a pass (left-padded prompts): fewer, fuller forwards; "
                "every row holds a KV cache, so memory grows with it. Default (null): nanochat's passes, one "
                "question's samples at a time, per_device_train_batch_size rows each"})
    shard_optimizer: bool = field(default=False, metadata={
        "help": "nanochat's sharded MuonAdamW (ZeRO-2 style state) instead of DDP's gradient all-reduce"})
    # GRPOConfig has no reward_funcs field (TRL keeps it on its CLI's GRPOScriptArguments), so this one does not
    # clash in TrlParser. Resolved in main() by modeling_nanochat.rl.rewards.resolve_rewards.
    reward_funcs: list[str] = field(default_factory=lambda: ["gsm8k"], metadata={
        "help": "reward functions, summed with GRPOConfig.reward_weights: registered names "
                "(modeling_nanochat/rl/rewards.py) or dotted paths to your own function with TRL's reward signature "
                "(it receives the dataset's columns, e.g. answer, and completion_text: completions decoded with "
                "special tokens)"})


def derive_accumulation(args, rl_args, world_size: int):
    """GRPOConfig with gradient_accumulation_steps (= steps_per_generation) set from examples_per_step, so one
    optimizer step consumes one generation batch of examples_per_step x num_generations completions (on-policy)."""
    if rl_args.examples_per_step is None:
        return args
    completions = rl_args.examples_per_step * args.num_generations
    per_step = args.per_device_train_batch_size * world_size
    if completions % per_step:
        raise NanochatError(f"examples_per_step x num_generations = {completions} completions per step is not divisible "
                         f"by per_device_train_batch_size x processes = {per_step}; change one of them")
    # replace() re-runs __post_init__, which derives generation_batch_size from the new accumulation steps
    return dataclasses.replace(args, gradient_accumulation_steps=completions // per_step,
                               steps_per_generation=None, generation_batch_size=None)


def main(rl_args, training_args, model_args):
    from transformers import AutoModelForCausalLM

    import modeling_nanochat  # noqa: F401 - registers the model type with the Auto classes
    from modeling_nanochat.generation.calculator import use_calculator
    from modeling_nanochat.rl.prompts import prompt_dataset
    from modeling_nanochat.rl.trainer import NanoChatGRPOTrainer, rl_muon_setup
    from modeling_nanochat.rl.rewards import resolve_rewards
    from modeling_nanochat.utils.distributed import world_size
    from modeling_nanochat.optim.trainer_mixin import MetricsFileCallback
    from modeling_nanochat.checkpoints.model_dirs import load_model, load_model_tokenizer

    if not model_args.model_name_or_path:
        raise NanochatError("set model_name_or_path to the SFT checkpoint directory (an HF model dir with its tokenizer)")
    if rl_args.rollout_rows is not None and rl_args.rollout_rows < 1:
        raise NanochatError(f"rollout_rows={rl_args.rollout_rows}: set a positive number of rows per sampling pass, "
                            "or null for nanochat's passes (one question at a time)")
    if model_args.use_peft:
        raise NanochatError("use_peft is not supported by this recipe: MuonAdamW's groups are nanochat's full parameters")
    training_args = derive_accumulation(training_args, rl_args, world_size())
    # Resolve before loading anything, so a typo fails in seconds. The launch directory goes on sys.path (last, so
    # it shadows nothing) as `trl grpo` does, so `my_rewards.score` next to your config imports.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    reward_funcs = resolve_rewards(rl_args.reward_funcs)

    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(__import__("torch"), model_args.dtype)
    model = load_model(model_args.model_name_or_path, AutoModelForCausalLM, dtype=dtype or "auto",
                       trust_remote_code=training_args.trust_remote_code)
    tokenizer = load_model_tokenizer(model_args.model_name_or_path, config=model.config)
    train = prompt_dataset(rl_args.prompts, rl_args.data, "train")
    evaluate = training_args.eval_strategy != "no"
    eval_set = prompt_dataset(rl_args.prompts, rl_args.eval_data, "test", limit=rl_args.eval_examples) if evaluate \
        else None

    trainer = NanoChatGRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=training_args, train_dataset=train, eval_dataset=eval_set,
        processing_class=tokenizer, calculator=use_calculator if rl_args.calculator else None,
        rollout_rows=rl_args.rollout_rows,
        muon_setup=rl_muon_setup(init_lr_frac=rl_args.init_lr_frac, unembedding_lr=rl_args.unembedding_lr,
                                 embedding_lr=rl_args.embedding_lr, matrix_lr=rl_args.matrix_lr,
                                 scalar_lr=rl_args.scalar_lr, weight_decay=training_args.weight_decay,
                                 shard_optimizer=rl_args.shard_optimizer),
        callbacks=[MetricsFileCallback(os.path.join(training_args.output_dir, "metrics.jsonl"))])
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"model saved to {training_args.output_dir}")


def make_parser():
    from trl import GRPOConfig, ModelConfig, TrlParser

    return TrlParser((NanoChatRLArguments, GRPOConfig, ModelConfig))


def cli(argv=None) -> int:
    """The command line: a user mistake (NanochatError) is one `error:` line and exit status 2; SIGTERM/SIGINT saves a
    checkpoint and exits 128 + signum."""
    def run(args):
        from modeling_nanochat.optim.trainer_mixin import TrainingInterrupted, report_interrupted

        try:
            main(*make_parser().parse_args_and_config(args))
        except TrainingInterrupted as e:  # SIGTERM/SIGINT: checkpoint saved, one line, exit 128 + signum
            return report_interrupted(e)
        return 0
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(cli())
