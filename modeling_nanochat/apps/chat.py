"""Chat with a model in the terminal, as nanochat's scripts/chat_cli.py does.

    python -m modeling_nanochat.apps.chat                       # the newest model under runs/
    python -m modeling_nanochat.apps.chat --model runs/d20 -p "Why is the sky blue?"     # one reply, then exit
    python -m modeling_nanochat.apps.chat --model user/nanochat-d20 -t 0 --max-tokens 512

Interactive: `clear` starts a new conversation, `quit`/`exit` (or end of input) leaves. The calculator tool is on:
a call and its result are shown inline as `[calculator: 2+3] → 5`. Like nanochat, the conversation is kept as the
exact tokens the model produced (tool outputs included) instead of re-tokenized text, and a turn cut off by
--max-tokens is closed with <|assistant_end|>. Defaults are nanochat's: temperature 0.6, top-k 50, 256 tokens.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import torch

from modeling_nanochat.generation.calculator import use_calculator
from modeling_nanochat.tokenizer.chat_format import render_prompt
from modeling_nanochat.tokenizer.tokenizer import special_token_id
from modeling_nanochat.generation import static_decode
from modeling_nanochat.generation.tool_use import IncrementalDecoder, generate
from modeling_nanochat.utils.errors import cli_main

# segment a special token opens: tool call, tool output, or back to plain text
_SEGMENT_OF = {"<|python_start|>": "python", "<|python_end|>": "text",
               "<|output_start|>": "output", "<|output_end|>": "text"}


class ChatSession:
    """One conversation as token ids. ``reply(text)`` streams the assistant's answer as ``(segment, piece)`` pairs:
    segment "text" (the answer), "python" (a calculator expression the model wrote) or "output" (the calculator's
    result, forced into the stream by the tool). A new segment starts with an empty piece, so a caller sees every
    tool call even if it is empty."""

    def __init__(self, model, tokenizer, max_tokens: int = 256, temperature: float = 0.6, top_k: int | None = 50,
                 seed: int = 42, calculator=use_calculator):
        self.model, self.tokenizer = model, tokenizer
        self.gen_kwargs = dict(temperature=temperature, top_k=top_k or None, seed=seed, calculator=calculator)
        self.max_tokens = max_tokens
        self.context = getattr(model.config, "max_position_embeddings", None)
        sid = lambda name: special_token_id(tokenizer, name)  # noqa: E731
        self.bos, self.assistant_end = sid("<|bos|>"), sid("<|assistant_end|>")
        self.segment_of = {sid(name): seg for name, seg in _SEGMENT_OF.items()}
        self.tokens: list[int] = []
        self.clear()

    def clear(self) -> None:
        self.tokens = [self.bos]

    def reply(self, user_text: str) -> Iterator[tuple[str, str]]:
        # the renderer builds the user turn (<|user_start|> text <|user_end|> <|assistant_start|>); its own <|bos|>
        # is dropped because the conversation already starts with one
        turn = render_prompt(self.tokenizer, [{"role": "user", "content": user_text}], max_tokens=sys.maxsize)[1:]
        prompt = self.tokens + turn
        budget = self.max_tokens
        if self.context:
            budget = min(budget, self.context - len(prompt))
            if budget < 1:
                raise ValueError(f"the conversation ({len(prompt)} tokens) fills the model's context of "
                                 f"{self.context} tokens; type 'clear' to start a new one")
        produced, segment = [], "text"
        decoder = IncrementalDecoder(self.tokenizer)
        for column, _ in generate(self.model, self.tokenizer, prompt, num_samples=1, max_tokens=budget,
                                  **self.gen_kwargs):
            token = column[0]
            produced.append(token)
            if token in (self.assistant_end, self.bos):
                break
            if token in self.segment_of:
                yield from self._flush(decoder, segment)
                segment, decoder = self.segment_of[token], IncrementalDecoder(self.tokenizer)
                yield segment, ""
                continue
            piece = decoder.push(token)
            if piece:
                yield segment, piece
        yield from self._flush(decoder, segment)
        if not produced or produced[-1] != self.assistant_end:
            produced.append(self.assistant_end)  # a turn cut off by max_tokens is still closed, as nanochat does
        self.tokens = prompt + produced

    def _flush(self, decoder: IncrementalDecoder, segment: str):
        """Bytes held back for an unfinished character are shown when their segment ends (as U+FFFD if broken)."""
        rest = self.tokenizer.decode(decoder.tokens)[decoder.emitted:]
        if rest:
            yield segment, rest


# How the terminal shows a segment's start and end.
_OPEN = {"python": "[calculator: ", "output": " → "}
_CLOSE = {"python": "]"}


def print_reply(pieces: Iterator[tuple[str, str]], out=sys.stdout) -> None:
    current = "text"
    for segment, piece in pieces:
        if segment != current or (piece == "" and segment != "text"):
            out.write(_CLOSE.get(current, "") + _OPEN.get(segment, ""))
            current = segment
        out.write(piece)
        out.flush()
    out.write(_CLOSE.get(current, "") + "\n")
    out.flush()


def load(model_dir: str, device: str | None = None, dtype: str = "auto"):
    """(model, tokenizer) for chatting. Our classes are registered with the Auto classes by the package import
    that loading this module implies; other causal LMs with a nanochat tokenizer load as themselves."""
    from transformers import AutoModelForCausalLM

    from modeling_nanochat.checkpoints.model_dirs import load_model, load_model_tokenizer
    from modeling_nanochat.utils import dtypes

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = dtypes.torch_dtype(dtype, device)
    model = load_model(model_dir, AutoModelForCausalLM, dtype=torch_dtype).to(device).eval()
    return model, load_model_tokenizer(model_dir, config=model.config)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory or Hub id (default: the newest model under "
                                                 "--runs-dir: a run's final model, else its highest checkpoint)")
    p.add_argument("--runs-dir", default="runs", help="where training runs live (default: runs)")
    p.add_argument("-p", "--prompt", default="", help="ask one question, print the reply and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--no-tools", action="store_true", help="do not run the calculator on python calls")
    p.add_argument("--compile", action="store_true", help=static_decode.COMPILE_HELP)
    args = p.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or args.max_tokens < 1:
        p.error("need --temperature >= 0, --top-k >= 0 and --max-tokens >= 1")
    return args


def main(argv=None) -> int:
    return cli_main(_main, argv)


def _main(argv=None) -> int:
    args = _parse(argv)
    if args.compile:
        static_decode.enable()
    from modeling_nanochat.checkpoints.model_dirs import resolve_model

    try:
        model_dir = resolve_model(args.model, args.runs_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.reconfigure(errors="replace")  # model output may hold characters the terminal cannot show
    model, tokenizer = load(model_dir, args.device, args.dtype)
    session = ChatSession(model, tokenizer, max_tokens=args.max_tokens, temperature=args.temperature,
                          top_k=args.top_k, seed=args.seed, calculator=None if args.no_tools else use_calculator)
    if args.prompt:
        try:
            print_reply(session.reply(args.prompt))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    print(f"\nnanochat-hf chat with {model_dir}\n" + "-" * 50)
    print("Type 'quit' or 'exit' to end the conversation\nType 'clear' to start a new conversation\n" + "-" * 50)
    while True:
        try:
            user = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print("\nGoodbye!")
            return 0
        if user.lower() in ("quit", "exit"):
            print("Goodbye!")
            return 0
        if user.lower() == "clear":
            session.clear()
            print("Conversation cleared.")
            continue
        if not user:
            continue
        print("\nAssistant: ", end="", flush=True)
        try:
            print_reply(session.reply(user))
        except ValueError as e:  # the conversation outgrew the context
            print(f"\n{e}")
        except KeyboardInterrupt:  # Ctrl-C stops this reply (the turn is dropped), not the chat
            print("\n(reply interrupted)")


if __name__ == "__main__":
    sys.exit(main())
