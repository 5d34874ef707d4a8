"""ChatCORE tasks, by CLI name, in nanochat's order (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval), and the
synthetic chat task of the offline speedrun (not part of ChatCORE)."""

from .arc import ARCChallenge, ARCEasy
from .common import ChatTask, HubSource, render_mc
from .gsm8k import GSM8K
from .humaneval import HumanEval
from .mmlu import MMLU
from .synthetic import SynthChat

TASKS: dict[str, type[ChatTask]] = {t.name: t for t in (ARCEasy, ARCChallenge, MMLU, GSM8K, HumanEval)}  # ChatCORE
ALL_TASKS: dict[str, type[ChatTask]] = {**TASKS, SynthChat.name: SynthChat}

__all__ = ["TASKS", "ALL_TASKS", "SynthChat", "ChatTask", "HubSource", "render_mc", "ARCEasy", "ARCChallenge", "MMLU", "GSM8K", "HumanEval"]
