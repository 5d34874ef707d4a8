"""Batched sampling with nanochat's calculator tool, on any transformers causal LM and its KV cache.

The loop is nanochat's Engine (§5.6, §8.1) on the standard HF API — ``model(input_ids=..., cache=...,
use_cache=True, position_ids=...)`` returning ``.logits`` and the cache (named ``past_key_values`` before
transformers 5.25: ``hf_cache`` picks the name) — so it runs our NanoChatForCausalLM and any other transformers
model. The prompt is prefilled once and the cache repeated for ``num_samples`` rows; several different prompts
(GRPO rollouts of many questions in one pass) are prefilled together, left-padded, and decoded with an attention
mask and per-row positions. Each step yields a column of
tokens, one per row, and a mask column: 1 = sampled by the model, 0 = forced by the tool. When a row closes
``<|python_start|> expr <|python_end|>``, the calculator's result is forced into that row as
``<|output_start|> result <|output_end|>`` (mask 0, so losses and RL can leave it out).
A row is finished once it emits ``<|assistant_end|>`` or ``<|bos|>``; like nanochat, finished rows keep being fed
(their tokens are ignored by ``generate_batch``) and the loop stops when all rows are finished or after
``max_tokens`` steps. With several prompts, finished rows leave the forwards once a quarter of the rows still decoded
has finished (their cache rows are dropped; their column entries repeat the stop token, mask 0).
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
        self.stop: int | None = None  # the token that finished the row


class _Specials:
    def __init__(self, tokenizer):
        get = lambda name: special_token_id(tokenizer, f"<|{name}|>")  # noqa: E731
        self.python_start, self.python_end = get("python_start"), get("python_end")
        self.output_start, self.output_end = get("output_start"), get("output_end")
        self.stops = {get("assistant_end"), get("bos")}


def _prefill_padded(model, prompts: list[list[int]], device):
    """One forward of several prompts, left-padded: each row's last position is its last token (the one the next
    step's smear reads from the cache). Returns (last logits (rows, V), cache, attention mask (rows, width))."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), prompts[0][0], dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    logits, cache = tuple_logits_cache(model(
        input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, logits_to_keep=1,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), return_dict=False))
    return logits[:, -1, :], cache, mask.to(device)


def _prefill_many(model, prompts: list[list[int]], device):
    """Rows continuing different prompts: the distinct prompts run once and their cache rows are copied to every row
    of the same prompt. Returns (last logits (rows, V), cache, attention mask over the cached positions)."""
    distinct: dict[tuple, int] = {}
    row_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    logits, cache, mask = _prefill_padded(model, [list(p) for p in distinct], device)
    if len(distinct) < len(prompts):
        if hasattr(cache, "batch_select_indices"):  # DynamicCache and subclasses: copy rows, no recompute
            index = torch.tensor(row_of, device=device)
            cache.batch_select_indices(index)
            logits, mask = logits[index], mask[index]
        else:  # a cache class without row selection: every row runs its prompt
            logits, cache, mask = _prefill_padded(model, prompts, device)
    return logits, cache, mask


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


def as_prompts(prompt: list[int] | list[list[int]]) -> list[list[int]]:
    """``generate``'s ``prompt`` as a list of prompts: one prompt (token ids) or a list of them."""
    return [list(p) for p in prompt] if prompt and isinstance(prompt[0], (list, tuple)) else [prompt]


@torch.inference_mode()
def generate(model, tokenizer, prompt: list[int] | list[list[int]], num_samples: int = 1,
             max_tokens: int | None = None, temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
             calculator: Callable[[str], object] | None = use_calculator,
             compile: bool | None = None) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``(token_column, mask_column)`` per step for ``num_samples`` rows continuing ``prompt`` (token ids,
    e.g. from chat_format.render_prompt). ``prompt`` may also be a list of prompts: ``num_samples`` rows for each,
    consecutive, in one batch (left-padded, with an attention mask). ``calculator=None`` disables tool use.
    ``compile``: decode through a static cache and a compiled step (``generation.static_decode``; None: the
    NANOCHAT_COMPILE switch; one prompt only, several decode eagerly); same tokens, faster per step once compiled."""
    prompts = as_prompts(prompt)
    if not all(p and all(isinstance(t, int) for t in p) for p in prompts):
        raise ValueError("prompt must be a non-empty list of token ids, or a list of them (render each with "
                         "chat_format first)")
    prompt = prompts[0]
    rows_total = num_samples * len(prompts)
    if max_tokens is None:
        max_tokens = getattr(model.config, "max_position_embeddings", 2048) - max(len(p) for p in prompts)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sp = _Specials(tokenizer)
    vocab = len(tokenizer)  # models may pad their output layer; never sample an id the tokenizer lacks

    static = attention = None
    if len(prompts) > 1:  # per-row positions and a padding mask that grows by a column per step
        row_prompts = [p for p in prompts for _ in range(num_samples)]
        logits, cache, attention = _prefill_many(model, row_prompts, device)
        positions = torch.tensor([len(p) for p in row_prompts], device=device)[:, None]
        (cache_name,) = cache_kwargs(model, None)
    elif compile_enabled(compile) and can_compile(model):
        static = StaticDecoder(model, prompt, num_samples, max_tokens)
        logits = static.first_logits
    else:
        logits, cache = _prefill(model, prompt, num_samples, device)
        (cache_name,) = cache_kwargs(model, None)  # the forward's name for the cache, looked up once
    rows = [_Row() for _ in range(rows_total)]
    markers = sp.stops | {sp.python_start, sp.python_end}  # the tokens that change a row's tool state
    position = len(prompt)
    live = None  # several prompts: the rows still decoded, once finished ones were dropped (None: every row)
    for _ in range(max_tokens):
        if all(r.done for r in rows):
            break
        sampled = sample_next_token(logits[:, :vocab].float(), generator, temperature, top_k)[:, 0].tolist()
        if live is not None:
            full = [None] * rows_total
            for k, r in enumerate(live):
                full[r] = sampled[k]
            sampled = full
        column, masks = [], []
        for row, token in zip(rows, sampled):
            if token is None:  # dropped once finished: its stop token again (a finished row's tokens are ignored)
                column.append(row.stop)
                masks.append(0)
                continue
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
        ids = column
        if attention is None:
            step = {"position_ids": torch.full((rows_total, 1), position, device=device)}
        else:
            current = live if live is not None else range(rows_total)
            keep = [k for k, r in enumerate(current) if not rows[r].done]
            if keep and len(keep) <= 3 * len(current) // 4 and hasattr(cache, "batch_select_indices"):
                # a quarter of the decoded rows finished: copy the others' cache rows rather than keep feeding
                # finished rows until the longest row of the whole batch ends (rollout batches mix questions)
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention, positions = attention[index], positions[index]
                live = [current[k] for k in keep]
            if live is not None:
                ids = [column[r] for r in live]
            attention = torch.cat([attention, attention.new_ones(len(ids), 1)], dim=1)
            step = {"position_ids": positions, "attention_mask": attention}
            positions = positions + 1
        logits, cache = tuple_logits_cache(model(
            input_ids=torch.tensor(ids, device=device)[:, None], use_cache=True, return_dict=False,
            **step, **{cache_name: cache}))
        logits = logits[:, -1, :]
        position += 1


def _advance(row: _Row, token: int, sp: _Specials, tokenizer, calculator) -> None:
    """Update one row's tool state after ``token``; queue the calculator's answer when a python call closes."""
    if token in sp.stops:
        row.done, row.stop = True, token
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
