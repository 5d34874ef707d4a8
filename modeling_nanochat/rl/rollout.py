"""GRPO rollouts through the library's tool-use sampler, so the calculator works during RL (§5.6, §7).

TRL 1.16's supported hook for custom generation is ``GRPOTrainer(rollout_func=...)``: the trainer calls
``rollout_func(prompts, trainer)`` with this process's prompts (the sampler has already repeated each one
``num_generations`` times, consecutively) and expects ``prompt_ids``, ``completion_ids`` and ``logprobs`` back; any
other key goes to the reward functions, except ``env_mask``, which the trainer multiplies into the loss mask
(``completion_mask * tool_mask`` in ``_compute_loss``). ``ToolRollout`` fills these the way nanochat's chat_rl does:

* each run of identical prompts is one question; its samples are drawn in passes of at most
  ``per_device_train_batch_size`` rows (nanochat's ``--device-batch-size``), each pass one ``tool_use.generate``
  call: prompt prefilled once, KV cache repeated, ``temperature``/``top_k`` sampling, the calculator's result forced
  as ``<|output_start|> result <|output_end|>`` after every ``<|python_start|> expr <|python_end|>``;
  with ``rows_per_pass`` set, the call's rows go in passes of that many rows instead, questions mixed (prompts
  left-padded, as TRL's own generation batches them): fewer, fuller forwards (8 questions x 8 samples in one pass of
  64 rows sample ~1.7x faster than 8 passes of 8 on the tiny speedrun's model, 2 CPU cores), from another random
  stream;
* ``env_mask`` is 1 on sampled tokens and 0 on forced tool-output tokens, so they are left out of the loss, as
  nanochat masks them (its Engine's mask 0 becomes target -1);
* a row that stopped keeps its stop token (``<|assistant_end|>`` or ``<|bos|>``) at the end of ``completion_ids``, so
  TRL's truncation statistics and ``mask_truncated_completions`` see it, but with ``env_mask`` 0: nanochat never
  trains the terminal token (``generate_batch`` drops it and the padding after it is masked);
* ``completion_text`` (the completion without its stop token, decoded *with* special tokens, as nanochat's
  ``tokenizer.decode`` does) is passed to the reward functions; see ``rewards.gsm8k_reward``.

Seeds: nanochat seeds each pass with ``hash((step, example_idx, pass))``. A rollout_func is not told dataset
indices, so here the seed is a hash of (``args.seed``, global step, train/eval, the prompt's token ids, pass index,
how many times the prompt already occurred in this call): deterministic, different for every pass and step, but
not nanochat's numbers (nor could they be: the sampler's random stream differs from nanochat's Engine anyway).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from modeling_nanochat.generation.calculator import use_calculator
from modeling_nanochat.tokenizer.chat_format import render_prompt
from modeling_nanochat.tokenizer.tokenizer import special_token_id
from modeling_nanochat.generation.tool_use import as_prompts, generate


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """A TRL prompt as nanochat prompt tokens ending in <|assistant_start|>: a list of chat messages ending with the
    user's (conversational format), or a string taken as the user message (standard format)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render_prompt(tokenizer, {"messages": messages})


def pass_seed(*parts) -> int:
    """A 31-bit seed from ints and int lists; stable across processes and runs (unlike Python's ``hash`` of str)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@torch.no_grad()
def sample_pass(model, tokenizer, prompt_ids: list[int] | list[list[int]], num_samples: int, *, max_tokens: int,
                temperature: float, top_k: int | None, seed: int, calculator) -> tuple[list[list[int]], list[list[int]]]:
    """One sampling pass of ``num_samples`` rows per prompt (one prompt, or a list: ``tool_use.generate``). Returns
    (completion ids, loss mask) per row: generated tokens with the stop token kept when the row stopped; mask 1 =
    sampled, 0 = forced by the tool or the stop token."""
    stops = {special_token_id(tokenizer, "<|assistant_end|>"), special_token_id(tokenizer, "<|bos|>")}
    rows = num_samples * len(as_prompts(prompt_ids))  # num_samples for each prompt given
    ids, masks, done = [[] for _ in range(rows)], [[] for _ in range(rows)], [False] * rows
    for column, mask_column in generate(model, tokenizer, prompt_ids, num_samples, max_tokens=max_tokens,
                                        temperature=temperature, top_k=top_k, seed=seed, calculator=calculator):
        for i, (token, m) in enumerate(zip(column, mask_column)):
            if done[i]:
                continue  # finished rows keep being fed by generate(); their tokens are not part of the sample
            done[i] = token in stops
            ids[i].append(token)
            masks[i].append(0 if done[i] else m)
        if all(done):
            break
    return ids, masks


def _runs(items: list) -> list[tuple[int, int]]:
    """(start, length) of each run of equal consecutive items."""
    runs, start = [], 0
    for i in range(1, len(items) + 1):
        if i == len(items) or items[i] != items[start]:
            runs.append((start, i - start))
            start = i
    return runs


class ToolRollout:
    """``rollout_func`` for TRL's GRPOTrainer that samples with nanochat's calculator tool (see the module docstring).

    Args:
        calculator: the tool, ``str -> result | None`` (default: nanochat's calculator); ``None`` samples without tools.
        rows_per_pass: None (default): nanochat's passes, one question each. A number: all of the call's rows in
            passes of that many, questions mixed (memory grows with it: every row holds a KV cache).

    Sampling settings come from the trainer's config at every call: ``max_completion_length``, ``temperature``,
    ``top_k`` (0 = full softmax), ``per_device_train_batch_size`` / ``per_device_eval_batch_size`` (rows per pass),
    ``seed``. ``top_p``, ``min_p``, ``repetition_penalty`` and ``generation_kwargs`` are not supported by nanochat's
    sampler and raise when set.
    """

    def __init__(self, calculator: Callable[[str], object] | None = use_calculator, rows_per_pass: int | None = None):
        if rows_per_pass is not None and rows_per_pass < 1:
            raise ValueError(f"rows_per_pass must be a positive number of rows or None, got {rows_per_pass}")
        self.calculator, self.rows_per_pass = calculator, rows_per_pass

    def __call__(self, prompts: list, trainer) -> dict:
        from trl.models import unwrap_model_for_generation  # trl is an optional dependency (train extra)

        args = trainer.args
        _check_sampling_args(args)
        training = trainer.model.training
        mode = "train" if training else "eval"
        rows_per_pass = args.per_device_train_batch_size if training else args.per_device_eval_batch_size
        tokenizer = trainer.processing_class
        top_k = args.top_k or None
        step = trainer.state.global_step

        prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
        completion_ids, env_mask = [], []
        # sample at the precision the loss's forward runs at (bf16 autocast on GPU), so rollouts are on-policy
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                         gather_deepspeed3_params=args.ds3_gather_for_generation,
                                         gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs) as model, \
                trainer.accelerator.autocast():
            model.eval()  # nanochat samples in eval mode
            try:
                for prompt, n, seed in self._passes(prompt_ids, rows_per_pass, (args.seed, step, mode)):
                    got_ids, got_masks = sample_pass(
                        model, tokenizer, prompt, n, max_tokens=args.max_completion_length,
                        temperature=args.temperature, top_k=top_k, seed=seed, calculator=self.calculator)
                    completion_ids += got_ids
                    env_mask += got_masks
            finally:
                model.train(training)

        stops = {special_token_id(tokenizer, "<|assistant_end|>"), special_token_id(tokenizer, "<|bos|>")}
        texts = tokenizer.batch_decode([c[:-1] if c and c[-1] in stops else c for c in completion_ids],
                                       skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None,
                "env_mask": env_mask, "completion_text": texts}

    def _passes(self, prompt_ids: list[list[int]], rows_per_pass: int, seed_base: tuple):
        """(prompt or list of prompts, rows per prompt, seed) of each sampling pass, in the order of the rows."""
        if self.rows_per_pass is not None:  # the rows as they come, questions mixed
            for first in range(0, len(prompt_ids), self.rows_per_pass):
                chunk = prompt_ids[first:first + self.rows_per_pass]
                yield chunk, 1, pass_seed(*seed_base, "rows", first, chunk[0])
            return
        seen: dict[tuple, int] = {}
        for start, count in _runs(prompt_ids):  # nanochat: a question's samples, rows_per_pass at a time
            ids = prompt_ids[start]
            occurrence = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
            for pass_idx, first in enumerate(range(0, count, rows_per_pass)):
                yield ids, min(rows_per_pass, count - first), pass_seed(*seed_base, ids, pass_idx, occurrence)


def _check_sampling_args(args) -> None:
    unsupported = []
    if getattr(args, "top_p", 1.0) != 1.0:
        unsupported.append(f"top_p={args.top_p}")
    if getattr(args, "min_p", None) not in (None, 0.0):
        unsupported.append(f"min_p={args.min_p}")
    if getattr(args, "repetition_penalty", 1.0) != 1.0:
        unsupported.append(f"repetition_penalty={args.repetition_penalty}")
    if getattr(args, "generation_kwargs", None):
        unsupported.append(f"generation_kwargs={args.generation_kwargs}")
    if getattr(args, "use_vllm", False):
        unsupported.append("use_vllm=True")
    if unsupported:
        raise ValueError(f"the tool-use rollout samples like nanochat (temperature and top_k only); unset "
                         f"{', '.join(unsupported)}, or train without the tool (plain GRPOTrainer / `trl grpo`)")
    if args.max_completion_length is None or args.max_completion_length < 1:
        raise ValueError("set max_completion_length (nanochat's --max-new-tokens, 256) to a positive number")
