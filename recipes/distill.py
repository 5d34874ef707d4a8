"""Distill a trained nanochat into a smaller one: pretraining (recipes/pretrain.py, every flag of it) whose loss
also follows a frozen teacher's next-token distribution. The student's --depth sets everything else, as in
pretraining; MuonAdamW, the dial's schedules, checkpoints and step-exact --resume are pretraining's.

    python recipes/distill.py --teacher runs/speedrun-tiny/base --depth 2 --tokenizer runs/speedrun-tiny/tokenizer \\
        --data runs/speedrun-tiny/data/pretrain --max-seq-len 256 --total-batch-size 4096 --device-batch-size 16 \\
        --num-iterations 150 --core-every -1 --output-dir runs/distilled-d2
    accelerate launch recipes/distill.py --teacher runs/d20 --depth 12 --tokenizer runs/tokenizer   # GPUs

Loss: --kd-alpha x T^2 x KL(teacher_T || student_T) + (1 - --kd-alpha) x cross-entropy on the text, T =
--kd-temperature (modeling_nanochat/pretrain/distill.py). metrics.jsonl records both terms (kd_loss, ce_loss);
val bpb is the student's own. The teacher must use the same tokenizer. Default output dir: runs/d<depth>-distilled.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from recipes.pretrain import build_parser as pretrain_parser  # noqa: E402


def build_parser():
    p = pretrain_parser()
    p.description = __doc__
    for action in p._actions:  # the same flags; --teacher is required here
        if action.dest == "teacher":
            action.required = True
    return p


def main(argv=None):
    from modeling_nanochat.utils.errors import cli_run

    from recipes.pretrain import train

    return cli_run(lambda a: train(a, build_parser()), argv)


if __name__ == "__main__":
    main()
