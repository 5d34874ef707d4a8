"""Chat with a nanochat-hf model in the browser (Gradio), locally with the calculator tool or through a server.

    python app.py                                  # newest model of the last run under runs/
    python app.py --model runs/d20/checkpoint-5000 # a checkpoint dir, or a Hub id
    python app.py --endpoint http://127.0.0.1:8000 # an OpenAI-compatible server (TGI, vLLM, transformers serve)

On a Hugging Face Space the same file runs as is: the Space sets $NANOCHAT_MODEL (a Hub id) or
$NANOCHAT_ENDPOINT, and Gradio's $GRADIO_SERVER_NAME/$GRADIO_SERVER_PORT (see space/README.md).

The local mode streams tokens (modeling_nanochat.apps.chat.ChatSession over tool_generation), runs calculator calls
and shows each call with its result as a collapsible "calculator" block. A server decodes with special tokens
skipped and runs no tool, so the endpoint mode is plain chat (the UI says so). Requests are queued: one
generation at a time on a local model (--concurrency), so several users wait their turn instead of sharing the
model mid-generation.
"""

from __future__ import annotations

import argparse
import os
import sys

import gradio as gr

from modeling_nanochat.apps import chat_backend as cb
from modeling_nanochat.apps.chat import load
from modeling_nanochat.generation import static_decode
from modeling_nanochat.utils.errors import NanochatError

EXAMPLES = [
    ["Why is the sky blue?"],
    ["What is 23 * 47? Use the calculator."],
    ["How many r are in strawberry?"],
    ["Write a haiku about tokenizers."],
]


def limited_slider(lo: float, hi: float, label: str, **kwargs) -> gr.Slider:
    """A slider whose out-of-range API values fail with a message naming the setting and its range (Gradio's own
    says only "Value 3 is greater than maximum value 2."). Wrapped per instance: a subclass would make Gradio
    write an app.pyi stub next to this file."""
    slider = gr.Slider(lo, hi, label=label, **kwargs)
    preprocess = slider.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except (gr.Error, TypeError, ValueError):  # out of range, or not a number at all ("abc", a list)
            raise gr.Error(f"{label} must be between {lo} and {hi}, got {payload!r}.", print_exception=False) \
                from None

    slider.preprocess = checked
    return slider


def message_box() -> gr.Textbox:
    """The message textbox. An API call may send null as the message: Gradio's ChatInterface would fail on it
    with "'NoneType' object has no attribute 'get'"; as "" it gets the empty-message limit's own message."""
    box = gr.Textbox(placeholder="Ask something…", max_length=cb.MAX_MESSAGE_CHARS, submit_btn=True, stop_btn=True)
    preprocess = box.preprocess
    box.preprocess = lambda payload: "" if payload is None else preprocess(payload)
    return box


def build_demo(backend, *, description: str, temperature: float = cb.DEFAULT_TEMPERATURE,
               top_k: int = cb.DEFAULT_TOP_K, max_tokens: int = cb.DEFAULT_MAX_TOKENS,
               concurrency: int = 1) -> gr.ChatInterface:
    """The chat UI around ``backend.stream(messages, temperature, top_k, max_tokens)`` (chat_backend.LocalChat or
    EndpointChat). The chat endpoint is ``/chat`` for gradio_client."""

    def respond(message, history, temperature, top_k, max_tokens):
        try:
            msgs = cb.history_to_conversation(message, history)
            cb.check_request(msgs, temperature, top_k, max_tokens)
            for parts in backend.stream(msgs, temperature, top_k, max_tokens):
                yield cb.parts_to_messages(parts, done=False) or ""
            yield cb.parts_to_messages(parts) or ""
        except (NanochatError, cb.EndpointError) as e:  # InputError, ModelUnavailable: for the user
            raise gr.Error(str(e), print_exception=False) from None  # a user's mistake: no traceback in the log

    lo_t, hi_t = cb.TEMPERATURE_RANGE
    lo_k, hi_k = cb.TOP_K_RANGE
    lo_m, hi_m = cb.MAX_TOKENS_RANGE
    return gr.ChatInterface(
        respond,
        textbox=message_box(),
        additional_inputs=[
            limited_slider(lo_t, hi_t, "Temperature", value=temperature, step=0.05,
                           info="0 = greedy (always the most likely token)"),
            limited_slider(lo_k, hi_k, "Top-k", value=top_k, step=1, info="0 = no top-k filtering"),
            limited_slider(lo_m, hi_m, "Max tokens", value=max_tokens, step=1),
        ],
        additional_inputs_accordion=gr.Accordion("Sampling", open=False),
        examples=EXAMPLES,
        cache_examples=False,  # Spaces cache examples by default: a sampled model would answer them once, forever
        title="nanochat-hf",
        description=description,
        api_name="chat",
        concurrency_limit=concurrency,
        fill_height=True,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help=f"checkpoint dir or Hub id (default: ${cb.MODEL_ENV}, else the newest model "
                     "of the last run under --runs-dir)")
    src.add_argument("--endpoint", help="URL of an OpenAI-compatible server (default: $NANOCHAT_ENDPOINT "
                     "unless --model is given)")
    p.add_argument("--endpoint-model", default=os.environ.get("NANOCHAT_ENDPOINT_MODEL"),
                   help="model name to send to the endpoint (default: $NANOCHAT_ENDPOINT_MODEL, else the first of "
                   "the server's /v1/models)")
    p.add_argument("--endpoint-timeout", type=float, default=float(os.environ.get("NANOCHAT_ENDPOINT_TIMEOUT", 600)),
                   help="seconds to wait for the endpoint's answer, and between streamed chunks, before the chat "
                   "fails with a message (default: $NANOCHAT_ENDPOINT_TIMEOUT, else 600)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="0.0.0.0 to accept connections from other machines (default: $GRADIO_SERVER_NAME or "
                   "127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--temperature", type=float, default=cb.DEFAULT_TEMPERATURE, help="initial slider value")
    p.add_argument("--top-k", type=int, default=cb.DEFAULT_TOP_K, help="initial slider value")
    p.add_argument("--max-tokens", type=int, default=cb.DEFAULT_MAX_TOKENS, help="initial slider value")
    p.add_argument("--concurrency", type=int, default=None,
                   help="generations running at once (default: 1 for a local model, 16 for an endpoint, which "
                   "batches them); others wait in the queue")
    p.add_argument("--max-queue", type=int, default=100, help="waiting requests beyond this are turned away")
    p.add_argument("--compile", action="store_true", help=static_decode.COMPILE_HELP)
    args = p.parse_args(argv)
    if args.model is None and args.endpoint is None:
        args.endpoint = os.environ.get("NANOCHAT_ENDPOINT") or None
    if not args.endpoint_timeout > 0:
        p.error(f"--endpoint-timeout must be a positive number of seconds, got {args.endpoint_timeout}")
    try:
        cb.check_request([{"role": "user", "content": "x"}], args.temperature, args.top_k, args.max_tokens)
    except cb.InputError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.compile:
        static_decode.enable()
    if args.endpoint:
        backend = cb.EndpointChat(args.endpoint, model=args.endpoint_model, timeout=args.endpoint_timeout)
        description = (f"Plain chat with the server at `{args.endpoint}`. Servers decode with special tokens "
                       "skipped and run no tool, so **calculator calls are not executed** here and top-k is not "
                       "sent (the OpenAI chat API has none); run `python app.py --model …` for tool use.")
        concurrency = args.concurrency or 16
    else:
        model_id = cb.resolve_model(args.model, args.runs_dir)
        print(f"loading {model_id}", flush=True)
        try:
            backend = cb.LocalChat(*load(model_id, args.device))
            description = (f"Model `{model_id}`, run locally with nanochat's calculator tool (calls and results "
                           "show as calculator blocks). Small models say odd things: this is a research toy.")
        except (NanochatError, OSError) as e:  # a broken checkpoint: the page still loads and says what is wrong
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            backend = cb.UnavailableChat(model_id, e)
            description = backend.description()
        concurrency = args.concurrency or 1
    demo = build_demo(backend, description=description, temperature=args.temperature, top_k=args.top_k,
                      max_tokens=args.max_tokens, concurrency=concurrency)
    demo.queue(default_concurrency_limit=concurrency, max_size=args.max_queue)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()
