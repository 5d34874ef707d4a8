"""On-policy distillation of a chat model with TRL's DistillationTrainer (Agarwal et al., GKD): the student samples
completions to chat prompts and learns to match the teacher's next-token distribution on its own samples (a
generalized Jensen-Shannon divergence; `beta` interpolates forward KL, JSD and reverse KL). Use it after SFT, to
shrink a chat model where the off-policy `recipes/distill.py` (pretraining text) is not enough.

    python recipes/distill_on_policy.py --config recipes/distill/on_policy_tiny.yaml \\
        --model_name_or_path runs/compress/distilled-d2-sft --teacher_model_name_or_path runs/speedrun-tiny/sft \\
        --data runs/speedrun-tiny/data/grpo/train.jsonl --output_dir runs/distilled-d2-gkd
    accelerate launch recipes/distill_on_policy.py --config recipes/distill/on_policy_tiny.yaml ...   # GPUs

Every YAML key is a flag (flags override the YAML): DistillationConfig / TrainingArguments fields, ModelConfig's
(`model_name_or_path`, `dtype`) and the ones below. Both models are checkpoints of this project with the same
tokenizer (checked). TRL's AdamW and schedule, not MuonAdamW: TRL owns this loop. The result is written to
`output_dir` like any checkpoint.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_nanochat.utils.errors import NanochatError, cli_main  # noqa: E402 - after the path line above


@dataclass
class OnPolicyDistillArguments:
    prompts: str = field(default="gsm8k", metadata={
        "help": "the prompt dataset by name (modeling_nanochat/rl/prompts.py)"})
    data: str | None = field(default=None, metadata={
        "help": "the prompts' local file (GSM8K format: question, answer); default: the Hub dataset"})
    max_prompts: int | None = field(default=None, metadata={"help": "use only the first N prompts"})


def main(args, training_args, model_args):
    import torch

    import modeling_nanochat  # noqa: F401 - registers the model type with the Auto classes
    from trl import DistillationTrainer

    from modeling_nanochat.checkpoints.model_dirs import load_model, load_model_tokenizer
    from modeling_nanochat.pretrain.distill import load_teacher
    from modeling_nanochat.rl.prompts import prompt_dataset

    if not model_args.model_name_or_path or not training_args.teacher_model_name_or_path:
        raise NanochatError("set model_name_or_path (the student) and teacher_model_name_or_path (the teacher): "
                            "both chat checkpoints of this project")
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else torch.float32
    student = load_model(model_args.model_name_or_path, dtype=dtype)
    tokenizer = load_model_tokenizer(model_args.model_name_or_path, config=student.config)
    teacher = load_teacher(training_args.teacher_model_name_or_path, student_config=student.config,
                           tokenizer_dir=model_args.model_name_or_path, device="cpu", dtype=dtype)
    train = prompt_dataset(args.prompts, args.data, "train", limit=args.max_prompts)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args, train_dataset=train,
                                  processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    tokenizer.save_pretrained(training_args.output_dir)
    trainer.accelerator.print(f"model saved to {training_args.output_dir}")


def make_parser():
    from trl import DistillationConfig, ModelConfig, TrlParser

    return TrlParser((OnPolicyDistillArguments, DistillationConfig, ModelConfig))


def cli(argv=None) -> int:
    return cli_main(lambda a: main(*make_parser().parse_args_and_config(a)) or 0, argv)


if __name__ == "__main__":
    sys.exit(cli())
