"""Batched sampling with nanochat's calculator tool, on any transformers causal LM and its KV cache.

The loop is nanochat's Engine (§5.6, §8.1) on the standard HF API — ``model(input_ids=..., cache=...,
use_cache=True, position_ids=...)`` returning ``.logits`` and the cache (named ``past_key_values`` before
transformers 5.25: ``hf_cache`` picks the name) — so it runs our NanoChatForCausalLM and any other transformers
model. The prompt is prefilled once and the cache repeated for ``num_samples`` rows. Each step yields a column of
tokens, one per row, and a mask column: 1 = sampled by the model, 0 = forced by the tool. When a row closes
``<|python_start|> expr <|python_end|>``, the calculator's result is forced into that row as
``<|output_start|> result <|output_end|>`` (mask 0, so losses and RL can leave it out).
A row is finished once it emits ``<|assistant_end|>`` or ``<|bos|>``; like nanochat, finished rows keep being fed
(their tokens are ignored by ``generate_batch``) and the loop stops when all rows are finished or after
``max_tokens`` steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import torch

from modeling_nanochat.generation.calculator import use_calculator
from modeling_nanochat.generation.hf_cache import cache_kwargs, prefill, tuple_logits_cache
from modeling_nanochat.generation.static_decode import StaticDecoder, can_compile, compile_enabled
from modeling_nanochat.tokenizer.tokenizer import encode_ordinary, special_token_id


def sample_next_token(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                      top_k: int | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids. temperature 0 = argmax; top_k restricts sampling to the k largest logits."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        choice = torch.multinomial(torch.softmax(values / temperature, dim=-1), 1, generator=generator)
        return indices.gather(1, choice)
    return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)


class _Row:
    """Tool state of one row: tokens waiting to be forced, and the python expression being collected."""

    def __init__(self):
        self.forced: deque[int] = deque()
        self.expr: list[int] | None = None  # not None while inside <|python_start|> ... <|python_end|>
        self.done = False


class _Specials:
    def __init__(self, tokenizer):
        get = lambda name: special_token_id(tokenizer, f"<|{name}|>")  # noqa: E731
        self.python_start, self.python_end = get("python_start"), get("python_end")
        self.output_start, self.output_end = get("output_start"), get("output_end")
        self.stops = {get("assistant_end"), get("bos")}


def _prefill(model, prompt: list[int], num_samples: int, device):
    """Run the prompt once and return (last logits (B, V), cache for B rows)."""
    logits, cache = prefill(model, prompt)
    if num_samples > 1:
        if hasattr(cache, "batch_repeat_interleave"):  # DynamicCache and subclasses: copy rows, no recompute
            cache.batch_repeat_interleave(num_samples)
            logits = logits.expand(num_samples, -1)
        else:
            ids = torch.tensor([prompt], dtype=torch.long, device=device)
            logits, cache = tuple_logits_cache(model(
                input_ids=ids.expand(num_samples, -1), use_cache=True, logits_to_keep=1, return_dict=False,
                position_ids=torch.arange(len(prompt), device=device)[None].expand(num_samples, -1)))
            logits = logits[:, -1, :]
    return logits, cache


@torch.inference_mode()
def generate(model, tokenizer, prompt: list[int], num_samples: int = 1, max_tokens: int | None = None,
             temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
             calculator: Callable[[str], object] | None = use_calculator,
             compile: bool | None = None) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``(token_column, mask_column)`` per step for ``num_samples`` rows continuing ``prompt`` (token ids,
    e.g. from chat_format.render_prompt). ``calculator=None`` disables tool use. ``compile``: decode through a
    static cache and a compiled step (``generation.static_decode``; None: the NANOCHAT_COMPILE switch); same
    tokens, faster per step once compiled."""
    if not prompt or not all(isinstance(t, int) for t in prompt):
        raise ValueError("prompt must be a non-empty list of token ids (render it with chat_format first)")
    if max_tokens is None:
        max_tokens = getattr(model.config, "max_position_embeddings", 2048) - len(prompt)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sp = _Specials(tokenizer)
    vocab = len(tokenizer)  # models may pad their output layer; never sample an id the tokenizer lacks

    static = None
    if compile_enabled(compile) and can_compile(model):
        static = StaticDecoder(model, prompt, num_samples, max_tokens)
        logits = static.first_logits
    else:
        logits, cache = _prefill(model, prompt, num_samples, device)
        (cache_name,) = cache_kwargs(model, None)  # the forward's name for the cache, looked up once
    rows = [_Row() for _ in range(num_samples)]
    markers = sp.stops | {sp.python_start, sp.python_end}  # the tokens that change a row's tool state
    position = len(prompt)
    for _ in range(max_tokens):
        if all(r.done for r in rows):
            break
        sampled = sample_next_token(logits[:, :vocab].float(), generator, temperature, top_k)[:, 0].tolist()
        column, masks = [], []
        for row, token in zip(rows, sampled):
            if row.forced:
                token = row.forced.popleft()
                masks.append(0)
            else:
                masks.append(1)
            column.append(token)
            # the tool's state machine runs only on the tokens that move it (a call per row and step costs a
            # batch-32 decode step ~1%)
            if row.expr is not None or token in markers:
                _advance(row, token, sp, tokenizer, calculator)
        yield column, masks
        if static is not None:
            logits = static.step(torch.tensor(column, device=device)[:, None], position)
            position += 1
            continue
        logits, cache = tuple_logits_cache(model(
            input_ids=torch.tensor(column, device=device)[:, None], use_cache=True, return_dict=False,
            position_ids=torch.full((num_samples, 1), position, device=device), **{cache_name: cache}))
        logits = logits[:, -1, :]
        position += 1


def _advance(row: _Row, token: int, sp: _Specials, tokenizer, calculator) -> None:
    """Update one row's tool state after ``token``; queue the calculator's answer when a python call closes."""
    if token in sp.stops:
        row.done = True
    if token == sp.python_start:
        row.expr = []
    elif token == sp.python_end and row.expr is not None:
        expr, row.expr = row.expr, None
        result = calculator(tokenizer.decode(expr)) if (calculator and expr) else None
        if result is not None:
            row.forced.extend([sp.output_start, *encode_ordinary(tokenizer, str(result)), sp.output_end])
    elif row.expr is not None:
        row.expr.append(token)


def generate_batch(model, tokenizer, prompt: list[int], num_samples: int = 1, **kwargs):
    """Run ``generate`` to the end; returns (sequences, masks): prompt + generated tokens per row, without the
    terminal <|assistant_end|>/<|bos|>, and masks (0 on the prompt, then 1 sampled / 0 forced)."""
    stops = _Specials(tokenizer).stops
    seqs = [list(prompt) for _ in range(num_samples)]
    masks = [[0] * len(prompt) for _ in range(num_samples)]
    done = [False] * num_samples
    for column, mask_column in generate(model, tokenizer, prompt, num_samples, **kwargs):
        for i, (token, m) in enumerate(zip(column, mask_column)):
            if done[i]:
                continue
            if token in stops:
                done[i] = True
            else:
                seqs[i].append(token)
                masks[i].append(m)
        if all(done):
            break
    return seqs, masks


class IncrementalDecoder:
    """Turns a token stream into text pieces, holding back bytes of an unfinished UTF-8 character (a token may end
    in the middle of one: decoding it alone would show U+FFFD)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.tokens: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def stream_text(model, tokenizer, prompt: list[int], skip_special_tokens: bool = False, **kwargs) -> Iterator[str]:
    """Text of one row (``num_samples=1``) as it is generated, tool calls and forced results included, the
    terminal token left out."""
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
    stops = _Specials(tokenizer).stops
    for column, _ in generate(model, tokenizer, prompt, num_samples=1, **kwargs):
        if column[0] in stops:
            return
        piece = decoder.push(column[0])
        if piece:
            yield piece
