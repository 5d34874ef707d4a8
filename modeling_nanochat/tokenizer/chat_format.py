"""nanochat's chat protocol: the token-level renderer (source of truth) and an equivalent Jinja chat template.

Layout, with no whitespace between pieces (NANOCHAT_REFERENCE §5.3):

    <|bos|> <|user_start|> user <|user_end|> <|assistant_start|> content <|assistant_end|> <|user_start|> ...

Assistant content is a string or a list of parts ``{"type": "text"|"python"|"python_output", "text": str}``;
``python`` is wrapped in <|python_start|>…<|python_end|>, ``python_output`` in <|output_start|>…<|output_end|>.
A leading system message is merged into the first user message as ``system + "\\n\\n" + user``.
Loss mask (1 = trained on): assistant text, python calls (with their two specials) and <|assistant_end|>;
everything else — BOS, user turns, <|assistant_start|>, tool outputs — is 0.

The renderer encodes every message/part on its own with ``encode_ordinary``, so a user typing "<|bos|>" gets
plain bytes, never the special id. ``CHAT_TEMPLATE`` produces the same ids and the same ``{% generation %}`` mask
through ``apply_chat_template`` (TRL's assistant_only_loss, TGI, vLLM, transformers serve) — checked against the
renderer in tests/tokenizer/test_chat_format.py — except in these documented cases:
* a special-token string typed inside a message becomes the special token (the template renders one string, and
  the tokenizer then matches specials in it); use the renderer for untrusted text;
* two *adjacent* text parts are tokenized as one string (the renderer encodes them apart);
* transformers maps a generation span to tokens through the span's last *character*, so if a supervised span ends
  in a multi-byte character right before a python_output part (text directly followed by a tool output, with no
  python call between), the tokens holding that character's last bytes are left unmasked. Supervised spans are
  therefore grouped so that every other span ends in a special token (<|python_end|> or <|assistant_end|>).
"""

from __future__ import annotations

from collections.abc import Mapping

from modeling_nanochat.tokenizer.tokenizer import encode_ordinary, special_token_id
from modeling_nanochat.utils.errors import DataError

ROLES_FIX = ("order the messages user, assistant, user, assistant, ... (one optional 'system' message may come first; "
             "roles are 'system', 'user' and 'assistant')")

PART_TYPES = ("text", "python", "python_output")

# Markers are written exactly "{% generation %}" / "{% endgeneration %}": TGI strips only those strings. The
# template has no whitespace outside tags, so trim settings of the Jinja engine (transformers, minijinja) don't matter.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set system = messages[0].content -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if message.role != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{- raise_exception('roles must alternate user/assistant (after an optional first system message)') -}}"
    "{%- endif -%}"
    "{%- if message.role == 'user' -%}"
    "{%- if message.content is not string -%}{{- raise_exception('user content must be a string') -}}{%- endif -%}"
    "{{- '<|user_start|>' -}}"
    "{%- if loop.first and system is not none -%}{{- system + '\\n\\n' -}}{%- endif -%}"
    "{{- message.content + '<|user_end|>' -}}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- set parts = [{'type': 'text', 'text': message.content}] if message.content is string else message.content -%}"
    "{%- set ns = namespace(segments=[], supervised='') -%}"
    "{%- for part in parts -%}"
    "{%- if part.type == 'text' -%}{%- set ns.supervised = ns.supervised + part.text -%}"
    "{%- elif part.type == 'python' -%}"
    "{%- set ns.supervised = ns.supervised + '<|python_start|>' + part.text + '<|python_end|>' -%}"
    "{%- elif part.type == 'python_output' -%}"
    "{%- set ns.segments = ns.segments + [ns.supervised, '<|output_start|>' + part.text + '<|output_end|>'] -%}"
    "{%- set ns.supervised = '' -%}"
    "{%- else -%}{{- raise_exception('unknown assistant part type: ' + part.type) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- for segment in ns.segments + [ns.supervised + '<|assistant_end|>'] -%}"
    "{%- if loop.index0 % 2 == 1 -%}{{- segment -}}"
    "{%- elif segment -%}{% generation %}{{- segment -}}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


def _messages(conversation) -> list:
    msgs = conversation.get("messages") if isinstance(conversation, Mapping) else conversation
    if not isinstance(msgs, list) or not msgs:
        raise DataError('a conversation is {"messages": [...]} (or the list itself) with at least one message',
                        'give the conversation its messages: [{"role": "user", "content": ...}, ...]')
    return msgs


def normalize_messages(conversation) -> list[dict]:
    """Validate and return the messages with a leading system message merged into the first user message."""
    msgs = _messages(conversation)
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}",
                            'write each message as {"role": ..., "content": ...}')
    if msgs[0]["role"] == "system":
        if len(msgs) < 2 or msgs[1]["role"] != "user":
            raise DataError("a system message must be followed by a user message (it is merged into it)", ROLES_FIX)
        if not isinstance(msgs[0]["content"], str) or not isinstance(msgs[1]["content"], str):
            raise DataError("system and user contents must be strings", "write those contents as plain strings")
        msgs = [{"role": "user", "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}, *msgs[2:]]
    offset = len(_messages(conversation)) - len(msgs)  # 1 when a system message was merged: report given indices
    for i, m in enumerate(msgs):
        expected = "user" if i % 2 == 0 else "assistant"
        n = i + offset
        if m["role"] != expected:
            where = ("a system message is allowed only first" if m["role"] == "system" else
                     f"expected {expected!r} there" if m["role"] in ("user", "assistant") else
                     f"{m['role']!r} is not a role, expected {expected!r}")
            raise DataError(f"message {n} has role {m['role']!r} but roles must alternate user/assistant starting "
                            f"with user (one optional system message first; {where})", ROLES_FIX)
        if expected == "user" and not isinstance(m["content"], str):
            raise DataError(f"user message {n}: content must be a string, got {type(m['content']).__name__}",
                            "write the user's message as a plain string")
        if expected == "assistant":
            _check_parts(n, m["content"])
    return msgs


def _check_parts(i: int, content) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise DataError(f"assistant message {i}: content must be a string or a list of parts",
                        "write the reply as a string, or as parts [{'type': 'text', 'text': ...}, ...]")
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            raise DataError(
                f"assistant message {i}, part {j}: expected {{'type': one of {PART_TYPES}, 'text': str}}, "
                f"got {part!r:.80}",
                f"give every part a 'type' ({', '.join(PART_TYPES)}) and a string 'text'"
            )


def render_conversation(tokenizer, conversation, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = supervised) of a conversation, truncated to ``max_tokens``."""
    msgs = normalize_messages(conversation)
    sid = {name: special_token_id(tokenizer, f"<|{name}|>") for name in (
        "bos", "user_start", "user_end", "assistant_start", "assistant_end",
        "python_start", "python_end", "output_start", "output_end")}
    # (token ids, mask value) pieces; texts are encoded in one batch call at the end
    pieces: list[tuple[list[int] | str, int]] = [([sid["bos"]], 0)]
    for m in msgs:
        if m["role"] == "user":
            pieces += [([sid["user_start"]], 0), (m["content"], 0), ([sid["user_end"]], 0)]
            continue
        pieces.append(([sid["assistant_start"]], 0))
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for part in parts:
            if part["type"] == "text":
                pieces.append((part["text"], 1))
            elif part["type"] == "python":
                pieces += [([sid["python_start"]], 1), (part["text"], 1), ([sid["python_end"]], 1)]
            else:  # python_output comes from the tool at inference time: never supervised
                pieces += [([sid["output_start"]], 0), (part["text"], 0), ([sid["output_end"]], 0)]
        pieces.append(([sid["assistant_end"]], 1))

    texts = [p for p, _ in pieces if isinstance(p, str)]
    encoded = iter(encode_ordinary(tokenizer, texts))
    ids, mask = [], []
    for piece, m in pieces:
        piece_ids = next(encoded) if isinstance(piece, str) else piece
        ids += piece_ids
        mask += [m] * len(piece_ids)
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tokenizer, conversation, max_tokens: int = 2048) -> list[int]:
    """Prompt ids for generation: the conversation without its last (assistant) message, then <|assistant_start|>."""
    msgs = _messages(conversation)
    if msgs[-1].get("role") != "assistant":
        raise ValueError("render_for_completion expects the last message to be the assistant's (it is dropped)")
    ids, _ = render_conversation(tokenizer, {"messages": msgs[:-1]}, max_tokens=max_tokens)
    return ids + [special_token_id(tokenizer, "<|assistant_start|>")]


def render_prompt(tokenizer, conversation, max_tokens: int = 2048) -> list[int]:
    """Prompt ids for a conversation that ends with a user message (chat apps): render + <|assistant_start|>."""
    msgs = normalize_messages(conversation)
    if msgs[-1]["role"] != "user":
        raise ValueError("render_prompt expects the last message to be the user's")
    ids, _ = render_conversation(tokenizer, {"messages": msgs}, max_tokens=max_tokens)
    return ids + [special_token_id(tokenizer, "<|assistant_start|>")]
