"""Rewards for TRL's GRPOTrainer chosen by name; nanochat's GSM8K correctness reward, graded as its RL does (§7).

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

``recipes/grpo.py`` picks its rewards by name (``reward_funcs: [gsm8k]``; its prompts, by name, in
``rl/prompts.py``) through :func:`resolve_rewards`: a name in
:data:`REWARDS` (add one with :func:`register_reward`) or a dotted path ``package.module.function`` to any function
with TRL's reward signature. The stock ``trl grpo`` CLI does not know these names (only its own and dotted paths).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

from evaluation.metrics.gsm8k.extraction import is_correct

from modeling_nanochat.utils.errors import NanochatError


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


RewardFunc = Callable[..., list[float]]

# Name -> reward function with TRL's signature. Names never contain a dot, so a spec is a name or a dotted path,
# never ambiguous.
REWARDS: dict[str, RewardFunc] = {"gsm8k": gsm8k_reward}


def register_reward(name: str) -> Callable[[RewardFunc], RewardFunc]:
    """Decorator adding a reward function to :data:`REWARDS` under ``name``, so configs can say
    ``reward_funcs: [name]``. The module defining it must be imported before the recipe resolves the names.

    Re-registering a name for a different function is an error: silently replacing ``gsm8k`` (say) would change what
    every config using that name trains on."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"reward name {name!r} must be a non-empty string without dots (dots mark dotted paths)")

    def add(func: RewardFunc) -> RewardFunc:
        if not callable(func):
            raise ValueError(f"register_reward({name!r}) needs a callable, got {type(func).__name__}")
        if REWARDS.get(name, func) is not func:
            raise ValueError(f"reward name {name!r} is already registered for {REWARDS[name].__qualname__}")
        REWARDS[name] = func
        return func

    return add


def _unresolvable(spec: str, problem: str) -> NanochatError:
    return NanochatError(f"cannot resolve reward {spec!r}: {problem}. Use a registered name "
                      f"({', '.join(sorted(REWARDS))}; see modeling_nanochat/rl/rewards.py) or a dotted path "
                      f"package.module.function to a function with TRL's reward signature")


def resolve_reward(spec: str | RewardFunc) -> RewardFunc:
    """The reward function a config names: a key of :data:`REWARDS`, or ``package.module.function`` (imported with
    importlib from ``sys.path`` as it stands). A callable is returned as is, so code may mix names and functions.

    Raises:
        ValueError: unknown name, module not importable, attribute missing or not callable; the message says which
            and lists the registered names.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise _unresolvable(str(spec), "expected a name or a dotted path")
    spec = spec.strip()
    if spec in REWARDS:
        return REWARDS[spec]
    module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise _unresolvable(spec, "no reward is registered under that name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:  # also the module's own failing imports: the message carries which one
        raise _unresolvable(spec, f"module {module_name!r} cannot be imported ({err})") from err
    if not hasattr(module, attr):
        raise _unresolvable(spec, f"module {module_name!r} has no attribute {attr!r}")
    func = getattr(module, attr)
    if not callable(func):
        raise _unresolvable(spec, f"{spec} is a {type(func).__name__}, not a function")
    return func


def resolve_rewards(specs: Iterable[str | RewardFunc]) -> list[RewardFunc]:
    """:func:`resolve_reward` for each spec, in order (TRL logs each as ``rewards/<function name>/mean``)."""
    if isinstance(specs, str):  # a bare string would be resolved letter by letter
        specs = [specs]
    funcs = [resolve_reward(spec) for spec in specs]
    if not funcs:
        raise NanochatError(f"no reward functions given: name at least one ({', '.join(sorted(REWARDS))}) or a dotted "
                         f"path package.module.function")
    return funcs
