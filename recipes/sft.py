"""Chat SFT: nanochat's chat_sft on TRL's SFTTrainer, with nanochat's data mixture, packing, MuonAdamW and schedules.

    accelerate launch recipes/sft.py --config recipes/sft/default.yaml \\
        --model_name_or_path runs/d20 --output_dir runs/d20-sft
    python recipes/sft.py --config recipes/sft/tiny_cpu.yaml --model_name_or_path runs/tiny   # offline CPU smoke run

The YAML keys are the fields of modeling_nanochat.sft.trainer.NanoChatSFTConfig (TRL's SFTConfig plus nanochat's
settings) and TRL's ModelConfig; any flag on the command line overrides the YAML (`--eval_steps 100`). Settings left
at -1 are inherited from the pretraining run, as nanochat's chat_sft does.

SIGTERM or Ctrl-C: the current step finishes, OUTPUT/checkpoint-N is saved and the run exits with 128 + signum;
the same command plus `--resume_from_checkpoint OUTPUT/checkpoint-N` continues it.

On CPU, 2 processes must be started like this (`accelerate launch --cpu` silently starts ONE):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --main_process_port 29533 recipes/sft.py --config recipes/sft/tiny_cpu.yaml ...
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None):
    from modeling_nanochat.utils.errors import cli_main

    return cli_main(_main, argv, errors=(FileNotFoundError,))


def _main(argv=None):
    from trl import ModelConfig, TrlParser

    from modeling_nanochat.optim.trainer_mixin import TrainingInterrupted, report_interrupted
    from modeling_nanochat.sft.setup import run
    from modeling_nanochat.sft.trainer import NanoChatSFTConfig

    args, model_args = TrlParser((NanoChatSFTConfig, ModelConfig)).parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO if args.process_index == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args, model_args.model_name_or_path, model_args)  # SFTSetupError / NanochatError: cli_main reports it
    except TrainingInterrupted as e:  # SIGTERM/SIGINT: checkpoint saved, one line, exit 128 + signum
        return report_interrupted(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
