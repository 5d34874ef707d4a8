"""ChatCORE tasks, by CLI name, in nanochat's order (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval)."""

from .arc import ARCChallenge, ARCEasy
from .common import ChatTask, HubSource, render_mc
from .gsm8k import GSM8K
from .humaneval import HumanEval
from .mmlu import MMLU

TASKS: dict[str, type[ChatTask]] = {t.name: t for t in (ARCEasy, ARCChallenge, MMLU, GSM8K, HumanEval)}

__all__ = ["TASKS", "ChatTask", "HubSource", "render_mc", "ARCEasy", "ARCChallenge", "MMLU", "GSM8K", "HumanEval"]
