"""GSM8K correctness reward for TRL's GRPOTrainer, graded exactly as nanochat's RL does (§7).

nanochat's reward is its evaluation outcome: 1.0 when the number after the first ``#### `` in the completion (commas
dropped) equals, as a string, the one in the reference solution's last text part, else 0.0. The grading lives in
``evaluation/metrics/gsm8k/extraction.py``; this module only adapts it to TRL's reward-function signature
(``reward(prompts=..., completions=..., completion_ids=..., **dataset_columns)``), so both ways in can use it:

* ``recipes/grpo.py`` (our tool-use rollout) passes ``completion_text``: the sampled tokens decoded *with* their
  special tokens, the way nanochat decodes them (``tokenizer.decode(generated_tokens)``). TRL's own ``completions``
  are decoded with ``skip_special_tokens=True``, which can change the grade: ``#### <|output_start|>72<|output_end|>``
  has no answer for nanochat but reads ``#### 72`` without the specials.
* ``trl grpo --config ... reward_funcs: [modeling_nanochat.rl.rewards.gsm8k_reward]`` (the stock path, no tool):
  only ``completions`` exist and are graded.

The dataset needs an ``answer`` column holding GSM8K's reference solution (or just its ``#### N`` line).
"""

from __future__ import annotations

from evaluation.metrics.gsm8k.extraction import is_correct


def completion_to_text(completion) -> str:
    """A TRL completion as text: a string (standard format) or a list of messages (conversational format, the
    last one being the assistant's, whose content is a string or a list of ``{"type": "text", "text": ...}`` parts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise TypeError(f"cannot read a completion of type {type(completion).__name__}: expected a string or a list "
                    f"of chat messages, got {completion!r:.80}")


def gsm8k_reward(prompts, completions, answer, completion_text=None, **kwargs) -> list[float]:
    """1.0 for a completion whose ``#### N`` equals the reference's, else 0.0 (nanochat's GSM8K reward).

    Args:
        prompts: the prompts (unused; part of TRL's signature).
        completions: TRL's decoded completions (used when ``completion_text`` is not given).
        answer: the dataset's ``answer`` column, one GSM8K reference solution per completion.
        completion_text: optional, one string per completion decoded with special tokens kept (our rollout's).
    """
    if answer is None:
        raise ValueError("gsm8k_reward needs the dataset's `answer` column (GSM8K reference solutions); keep it in "
                         "the training dataset (GRPOConfig.remove_unused_columns is False by default)")
    texts = list(completion_text) if completion_text is not None else [completion_to_text(c) for c in completions]
    if len(texts) != len(answer):
        raise ValueError(f"gsm8k_reward got {len(texts)} completions but {len(answer)} answers")
    return [float(is_correct(text, reference)) for text, reference in zip(texts, answer)]
