"""Compression report (bytes per token) of tokenizers on some texts, as a markdown table — like nanochat's tok_eval.

    python recipes/tok_eval.py --tokenizer ours=out/tokenizer [--tokenizer nanochat=converted_dir] [--text name=file]

GPT-2 and cl100k_base (GPT-4) are added as baselines when tiktoken can load them (it needs their files cached or
network access); otherwise the table compares the given tokenizers on the text at hand. Without --text, the report
uses ../shared/data/text_sample.txt when present and a Python-source sample from the standard library.
"""

import argparse
import inspect
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_nanochat.tokenizer.tokenizer import encode_ordinary, load_tokenizer  # noqa: E402

SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text_sample.txt"
MIXED_TEXT = (
    "In 2024, the committee approved 3 of the 17 proposals (17.6%). Résumé, naïve, façade. "
    "Die Straße ist lang. Быстрая лиса. 東京は日本の首都です。 서울은 한국의 수도입니다. "
    "E = mc^2; ∫_0^1 x^2 dx = 1/3; Σ_{i=1}^{n} i = n(n+1)/2. 🚀🔥 #hashtag @user https://example.com/a?b=c"
)


def default_texts() -> dict[str, str]:
    texts = {}
    if SHARED_TEXT.exists():
        texts["text_sample"] = SHARED_TEXT.read_text(encoding="utf-8")
    texts["python_code"] = inspect.getsource(json.decoder)  # fixed per Python version, always present offline
    texts["mixed"] = MIXED_TEXT
    return texts


def tiktoken_baselines() -> dict:
    """GPT-2 / cl100k encoders when tiktoken and their files are available (offline they usually are not)."""
    out = {}
    try:
        import tiktoken
    except ImportError:
        return out
    for name, enc_name in [("gpt2", "gpt2"), ("gpt4", "cl100k_base")]:
        try:
            enc = tiktoken.get_encoding(enc_name)
        except Exception as e:  # network error, missing cache: report and carry on with what we have
            print(f"note: {enc_name} unavailable ({type(e).__name__}); skipping that baseline", file=sys.stderr)
            continue
        out[name] = enc.encode_ordinary
    return out


def compression(encoders: dict, texts: dict) -> dict:
    """{tokenizer: {text: {"bytes", "tokens", "ratio"}}}; ratio = UTF-8 bytes per token (higher compresses more)."""
    result = {}
    for tname, encode in encoders.items():
        result[tname] = {}
        for name, text in texts.items():
            n_bytes, n_tokens = len(text.encode("utf-8")), len(encode(text))
            result[tname][name] = {"bytes": n_bytes, "tokens": n_tokens, "ratio": n_bytes / max(n_tokens, 1)}
    return result


def markdown_table(result: dict, reference: str) -> str:
    """One row per text; per tokenizer its tokens and bytes/token, and the token-count change vs ``reference``."""
    names = list(result)
    texts = list(result[reference])
    header = ["text", "bytes"] + [f"{n} tokens" for n in names] + [f"{n} bytes/tok" for n in names]
    header += [f"{n} vs {reference}" for n in names if n != reference]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in texts:
        ref = result[reference][t]["tokens"]
        cells = [t, str(result[reference][t]["bytes"])]
        cells += [str(result[n][t]["tokens"]) for n in names] + [f"{result[n][t]['ratio']:.3f}" for n in names]
        cells += [f"{(ref - result[n][t]['tokens']) / ref * 100:+.2f}%" for n in names if n != reference]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _named(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    return (name, path) if sep else (Path(value).name, value)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", action="append", required=True, help="[name=]dir of a saved tokenizer (repeatable)")
    p.add_argument("--text", action="append", help="[name=]path of a UTF-8 text file (repeatable)")
    p.add_argument("--no-baselines", action="store_true", help="skip the GPT-2 / cl100k baselines")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)

    texts = dict(_named(t) for t in args.text) if args.text else {}
    texts = {n: Path(path).read_text(encoding="utf-8") for n, path in texts.items()} or default_texts()
    encoders = {} if args.no_baselines else tiktoken_baselines()
    for name, directory in map(_named, args.tokenizer):
        tok = load_tokenizer(directory)
        encoders[name] = lambda text, tok=tok: encode_ordinary(tok, text)
    result = compression(encoders, texts)
    reference = "gpt2" if "gpt2" in result else next(iter(result))
    print(markdown_table(result, reference))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
