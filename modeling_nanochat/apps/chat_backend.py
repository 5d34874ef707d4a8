"""What app.py does apart from drawing the UI: input limits, the model to load, Gradio history <-> nanochat
conversation, and streaming replies from a local model (with the calculator tool) or an OpenAI-compatible endpoint.

Kept free of Gradio so it can be tested and reused (a CLI, another UI) on its own.

Replies stream as *parts* in chat_format's assistant format — ``{"type": "text"|"python"|"python_output",
"text": str}`` — so the UI can show a calculator call and its result as one block, and a later turn renders
them as the model produced them (the call and its output as special-token spans, not as typed text).
"""

from __future__ import annotations

import os
import random
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from modeling_nanochat.utils.errors import NanochatError

# nanochat's web server limits (scripts/chat_web.py, NANOCHAT_REFERENCE §8.3) and defaults
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_CONVERSATION_CHARS = 32_000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)  # 0 = no top-k filtering
MAX_TOKENS_RANGE = (1, 4096)
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_MAX_TOKENS = 0.8, 50, 512

TOOL_TITLE = "calculator"  # no emoji: headless/CI browsers often lack an emoji font
MODEL_ENV = "NANOCHAT_MODEL"


class InputError(NanochatError):
    """A request outside the limits; the message is meant for the user."""


class ModelUnavailable(NanochatError):
    """The model could not be loaded (a broken checkpoint): every chat is answered with what is wrong and the fix."""


class EndpointError(RuntimeError):
    """The server behind --endpoint failed or refused; the message is meant for the user."""


# ----------------------------------------------------------------------------------------------------------------
# Limits


def _content_chars(content) -> int:
    return len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)


def check_request(messages: list[dict], temperature: float, top_k: int, max_tokens: int) -> None:
    """Raise InputError when a request breaks nanochat's web-server limits (messages are user/assistant dicts,
    assistant content a string or a list of parts)."""
    if not messages:
        raise InputError("The conversation is empty: type a message.")
    if len(messages) > MAX_MESSAGES:
        raise InputError(f"Too many messages ({len(messages)}): at most {MAX_MESSAGES} per conversation. "
                         "Clear the chat to start a new one.")
    total = 0
    for i, m in enumerate(messages):
        n = _content_chars(m["content"])
        if n == 0 and m["role"] == "user":
            raise InputError(f"Message {i + 1} is empty: type some text.")
        if n > MAX_MESSAGE_CHARS:
            raise InputError(f"Message {i + 1} is too long ({n:,} characters): at most {MAX_MESSAGE_CHARS:,} "
                             "characters per message.")
        total += n
    if total > MAX_CONVERSATION_CHARS:
        raise InputError(f"The conversation is too long ({total:,} characters): at most "
                         f"{MAX_CONVERSATION_CHARS:,} in total. Clear the chat to start a new one.")
    for name, value, (lo, hi) in (("Temperature", temperature, TEMPERATURE_RANGE), ("Top-k", top_k, TOP_K_RANGE),
                                  ("Max tokens", max_tokens, MAX_TOKENS_RANGE)):
        if value is None or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise InputError(f"{name} must be between {lo} and {hi}, got {value!r}.")
    if top_k != int(top_k) or max_tokens != int(max_tokens):
        raise InputError(f"Top-k and max tokens must be whole numbers, got {top_k!r} and {max_tokens!r}.")


# ----------------------------------------------------------------------------------------------------------------
# Which model


def resolve_model(model: str | None, runs_dir: str = "runs") -> str:
    """``--model``, else $NANOCHAT_MODEL (a Space sets it), else the newest model under ``runs_dir`` (model_dirs:
    the run written last, its final model, else its highest checkpoint); a clear exit when there is none."""
    from modeling_nanochat.checkpoints.model_dirs import resolve_model as resolve_dir

    try:
        return resolve_dir(model or os.environ.get(MODEL_ENV), runs_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"No model to chat with: {e}.\nOr set ${MODEL_ENV} (a directory or Hub id), or chat with a "
                         "running server: python app.py --endpoint http://127.0.0.1:8000") from None


# ----------------------------------------------------------------------------------------------------------------
# Gradio history <-> nanochat conversation

_TOOL_BLOCK = re.compile(r"\A```\n(?P<expr>.*)\n```(?:\n\n= (?P<out>.*))?\Z", re.DOTALL)


def tool_block(expr: str, output: str | None) -> str:
    """Markdown of a calculator call (and its result once known); ``parse_tool_block`` reads it back."""
    return f"```\n{expr}\n```" + ("" if output is None else f"\n\n= {output}")


def parse_tool_block(text: str) -> list[dict]:
    m = _TOOL_BLOCK.match(text)
    if m is None:  # not ours (edited by hand?): keep it as text rather than inventing a tool call
        return [{"type": "text", "text": text}]
    parts = [{"type": "python", "text": m["expr"]}]
    if m["out"] is not None:
        parts.append({"type": "python_output", "text": m["out"]})
    return parts


def parts_to_messages(parts: list[dict], done: bool = True) -> list[dict]:
    """Assistant parts -> Gradio message dicts: text as plain messages, each calculator call with its output as a
    collapsible message titled TOOL_TITLE: "pending" (a spinner) while the call runs, then open without a status
    (Gradio would fold a "done" one, hiding the call)."""
    out = []
    for part in parts:
        if part["type"] == "text":
            if part["text"]:
                out.append({"role": "assistant", "content": part["text"]})
        elif part["type"] == "python":
            out.append({"role": "assistant", "content": tool_block(part["text"], None),
                        "metadata": {"title": TOOL_TITLE, "status": "pending"}})
        else:  # python_output belongs to the call before it
            if out and (out[-1].get("metadata") or {}).get("title") == TOOL_TITLE:
                expr = _TOOL_BLOCK.match(out[-1]["content"])["expr"]
                out[-1]["content"] = tool_block(expr, part["text"])
    if done:
        for m in out:
            if m.get("metadata"):
                m["metadata"].pop("status", None)
    return out


def _text_of(content) -> str:
    """Gradio 6 hands history content as a list of parts ({"type": "text", "text": ...}) or a string."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    texts = []
    for c in content or []:
        if isinstance(c, str):
            texts.append(c)
        elif isinstance(c, dict) and c.get("type") == "text":
            texts.append(c.get("text", ""))
        else:
            raise InputError("Only text messages are supported (no files or images).")
    return "".join(texts)


def history_to_conversation(message: str, history: list[dict]) -> list[dict]:
    """Gradio (message, history) -> alternating user/assistant messages; consecutive assistant messages (text and
    calculator blocks) are one assistant turn with parts."""
    msgs: list[dict] = []
    for h in history or []:
        text = _text_of(h.get("content"))
        if h.get("role") == "user":
            if msgs and msgs[-1]["role"] == "user":
                msgs.pop()  # never answered (refused, or stopped before the first token): not part of the chat
            msgs.append({"role": "user", "content": text})
            continue
        if h.get("role") != "assistant":
            raise InputError(f"Unknown role {h.get('role')!r} in the history: only user and assistant.")
        is_tool = ((h.get("metadata") or {}).get("title") == TOOL_TITLE)
        parts = parse_tool_block(text) if is_tool else [{"type": "text", "text": text}]
        if msgs and msgs[-1]["role"] == "assistant":
            msgs[-1]["content"] += parts
        elif msgs:  # (an assistant message before any user message has nothing to answer: left out)
            msgs.append({"role": "assistant", "content": parts})
    if msgs and msgs[-1]["role"] == "user":
        msgs.pop()
    msgs.append({"role": "user", "content": _text_of(message)})
    return msgs


def flatten_conversation(msgs: list[dict]) -> list[dict]:
    """Plain-text messages for OpenAI-compatible servers (they run no tool and know no parts)."""
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "".join(p["text"] for p in m["content"])} for m in msgs]


# ----------------------------------------------------------------------------------------------------------------
# Streaming replies


_PART_OF_SEGMENT = {"text": "text", "python": "python", "output": "python_output"}  # chat.ChatSession's names


@dataclass
class LocalChat:
    """A local model with nanochat's calculator tool (through chat.ChatSession). One generation at a time: the
    lock makes concurrent callers (Gradio worker threads, API users) wait their turn instead of sharing the model
    mid-generation."""

    model: object
    tokenizer: object

    def __post_init__(self):
        self.lock = threading.Lock()

    def stream(self, msgs: list[dict], temperature: float, top_k: int, max_tokens: int,
               seed: int | None = None) -> Iterator[list[dict]]:
        """Yield the reply's parts so far as it streams (tool calls and outputs included)."""
        from modeling_nanochat.apps.chat import ChatSession
        from modeling_nanochat.tokenizer.chat_format import render_conversation

        session = ChatSession(self.model, self.tokenizer, max_tokens=int(max_tokens), temperature=float(temperature),
                              top_k=int(top_k), seed=random.randint(0, 2**31 - 1) if seed is None else seed)
        if len(msgs) > 1:  # earlier turns as the exact tokens they stand for (tool calls as special-token spans)
            session.tokens = render_conversation(self.tokenizer, {"messages": msgs[:-1]}, max_tokens=10**9)[0]
        parts: list[dict] = []
        with self.lock:
            try:
                for segment, piece in session.reply(msgs[-1]["content"]):
                    kind = _PART_OF_SEGMENT[segment]
                    if not parts or parts[-1]["type"] != kind or (piece == "" and kind != "text"):
                        parts.append({"type": kind, "text": ""})
                    parts[-1]["text"] += piece
                    yield [dict(p) for p in parts if p["text"] or p["type"] != "text"]
            except ValueError as e:
                if parts:
                    raise
                # refused before generating: the conversation fills the model's context
                raise InputError(str(e).replace("type 'clear'", "clear the chat") + ".") from None
        yield [dict(p) for p in parts if p["text"] or p["type"] != "text"]


@dataclass
class UnavailableChat:
    """Stands in for a model that failed to load (a truncated model.safetensors, a config.json that is not JSON):
    the app still serves its page, which says what is wrong, and every chat gets the same message instead of the
    process dying with a traceback at start."""

    model_id: str
    error: Exception

    def _parts(self) -> tuple[str, str | None]:
        problem = getattr(self.error, "problem", None) or " ".join(str(self.error).split())
        return problem, getattr(self.error, "fix", None)

    def description(self) -> str:
        problem, fix = self._parts()
        return (f"**The model `{self.model_id}` could not be loaded**: `{problem}`"
                + (f"\n\n**Fix:** {fix}" if fix else "") + "\n\nThen restart the app.")

    def stream(self, msgs: list[dict], temperature: float, top_k: int, max_tokens: int,
               seed: int | None = None) -> Iterator[list[dict]]:
        problem, fix = self._parts()
        raise ModelUnavailable(f"The model {self.model_id} could not be loaded: {problem}",
                               f"{fix}, then restart the app" if fix else "restart the app with a working model")
        yield  # a generator like the other backends


def endpoint_base_url(url: str) -> str:
    """OpenAI-compatible servers (TGI, vLLM, transformers serve) answer under /v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass
class EndpointChat:
    """Plain chat with an OpenAI-compatible server through huggingface_hub.InferenceClient. The server renders the
    checkpoint's chat template, decodes with special tokens skipped and runs no tool; top-k is not part of the
    OpenAI chat API and is not sent. ``model`` defaults to the first id of the server's /v1/models (TGI accepts
    any name; vLLM and a pinned `transformers serve` want the served one). ``timeout``: seconds to wait for the
    server's answer and then between streamed chunks; a server that accepts the connection and never answers
    fails the chat after that long instead of holding it (and a queue slot) forever."""

    url: str
    model: str | None = None
    timeout: float = 600.0

    def __post_init__(self):
        from huggingface_hub import InferenceClient
        from huggingface_hub.constants import is_offline_mode

        if is_offline_mode():
            raise SystemExit("HF_HUB_OFFLINE is set: huggingface_hub then refuses every HTTP request, also to "
                             f"{self.url}. Unset it for the app (the endpoint mode needs no Hub access).")
        self.base_url = endpoint_base_url(self.url)
        self.client = InferenceClient(base_url=self.base_url, timeout=self.timeout)
        if self.model is None:
            self.model = self._served_model()

    def _served_model(self) -> str | None:
        import json
        import urllib.request

        try:
            with urllib.request.urlopen(self.base_url + "/models", timeout=min(10.0, self.timeout)) as r:
                return json.load(r)["data"][0]["id"]
        except Exception:  # optional endpoint (some servers fail on it): let the server pick its model
            return None

    def stream(self, msgs: list[dict], temperature: float, top_k: int, max_tokens: int,
               seed: int | None = None) -> Iterator[list[dict]]:
        text = ""
        try:
            for chunk in self.client.chat_completion(flatten_conversation(msgs), model=self.model, stream=True,
                                                     temperature=float(temperature), max_tokens=int(max_tokens),
                                                     seed=seed):
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                    yield [{"type": "text", "text": text}]
        except Exception as e:  # connection refused, HTTP 4xx/5xx, a broken stream: say which server and why
            detail = " ".join(str(e).split())[:500]
            refused = getattr(e, "response", None) is not None  # an HTTP answer, not a connection failure
            hint = " If the server serves a named model, pass --endpoint-model NAME." if refused and not self.model \
                else ""
            if "timeout" in type(e).__name__.lower() or "timed out" in detail.lower():
                hint = f" It did not answer within {self.timeout:g} s (--endpoint-timeout): is it overloaded or stuck?"
            raise EndpointError(f"The server at {self.url} failed: {type(e).__name__}: {detail}.{hint}") from e
        yield [{"type": "text", "text": text}]
