"""nanochat's tokenizer as a Hugging Face `PreTrainedTokenizerFast`.

nanochat trains a GPT-4-style byte-level BPE (rustbpe) and runs it with tiktoken. Both ends are rebuilt here on
the HF stack with the same ids:

* id layout: raw bytes 0-255 are ids 0-255 (no GPT-2 byte shuffling of the *ids*), merge i is id 256+i, then the
  nine special tokens in ``SPECIAL_TOKENS`` order;
* encoding follows tiktoken's rule (lowest-rank merge first, a whole pre-token that is in the vocab wins), which
  `transformers`' ``TikTokenConverter`` reproduces with ``BPE(ignore_merges=True)`` plus all valid merge splits;
* ``SPLIT_PATTERN`` uses possessive quantifiers (``?+``, ``++``); the `tokenizers` regex engine (Oniguruma)
  supports them — the golden tests in tests/tokenizer/test_tokenization.py prove identical ids to nanochat on real text.

So one builder, ``tokenizer_from_ranks``, serves both our own training (``train_bpe``) and the conversion of a
nanochat ``tokenizer.pkl`` (``convert_nanochat_tokenizer``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

from modeling_nanochat.utils.errors import DataError

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    "<|bos|>",  # prepended to every document (GPT-2's <|endoftext|> role)
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # assistant calls the python/calculator tool
    "<|python_end|>",
    "<|output_start|>",  # tool output, forced by the engine, never supervised
    "<|output_end|>",
]
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|assistant_end|>"  # what ends a generated chat turn
PAD_TOKEN = "<|bos|>"  # nanochat's SFT pads rows with BOS (and masks them)

# GPT-4's pattern with numbers limited to 1-2 digits (nanochat found 2 best at a 32K vocab).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKEN_BYTES_FILE = "token_bytes.pt"
_BYTE_TO_CHAR = bytes_to_unicode()  # byte-level BPE stores byte b as a printable unicode char
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _token_str(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def _token_raw_bytes(token: str) -> bytes:
    return bytes(_CHAR_TO_BYTE[c] for c in token)


# ----------------------------------------------------------------------------------------------------------------
# Building a tokenizer from tiktoken-style mergeable ranks


class _RanksConverter(TikTokenConverter):
    """TikTokenConverter that takes the ranks in memory instead of a .tiktoken file (so no blobfile needed)."""

    def __init__(self, ranks: dict[bytes, int], pattern: str):
        super().__init__(vocab_file=None, pattern=pattern, extra_special_tokens=SPECIAL_TOKENS)
        self._ranks = ranks

    def load_tiktoken_bpe(self, tiktoken_url):  # noqa: ARG002 - signature of the parent
        return self._ranks


def tokenizer_from_ranks(mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> Tokenizer:
    """A `tokenizers.Tokenizer` with id(token) == rank and the nine specials right after the ranks."""
    n = len(mergeable_ranks)
    if sorted(mergeable_ranks.values()) != list(range(n)):
        raise ValueError("mergeable ranks must be exactly 0..N-1 (one rank per token, no gaps)")
    missing = [b for b in range(256) if mergeable_ranks.get(bytes([b])) != b]
    if missing:
        raise ValueError(f"byte tokens must have rank == byte value (nanochat layout); wrong for bytes {missing[:8]}")
    tok = _RanksConverter(mergeable_ranks, pattern).converted()
    got = [tok.token_to_id(s) for s in SPECIAL_TOKENS]
    if got != list(range(n, n + len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens landed at {got}, expected {n}..{n + len(SPECIAL_TOKENS) - 1}")
    return tok


def as_hf_tokenizer(backend: Tokenizer, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Wrap a backend tokenizer with nanochat's special-token roles and chat template."""
    from modeling_nanochat.tokenizer.chat_format import CHAT_TEMPLATE  # late import: chat_format imports this module

    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # decoding must give the exact bytes back
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------------------------
# Training with HF tokenizers


def _ranks_from_trained(backend: Tokenizer) -> dict[bytes, int]:
    """HF's BpeTrainer numbers the 256-char alphabet in its own order and then new tokens in merge order;
    renumber to nanochat's layout (byte b -> b, merged tokens in creation order after them)."""
    vocab = backend.get_vocab()
    merged = sorted((i, t) for t, i in vocab.items() if len(t) > 1)
    ranks = {bytes([b]): b for b in range(256)}
    for _, t in merged:
        ranks[_token_raw_bytes(t)] = len(ranks)
    return ranks


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = 32768,
    *,
    length: int | None = None,
    show_progress: bool = True,
    pattern: str = SPLIT_PATTERN,
) -> PreTrainedTokenizerFast:
    """Train nanochat's byte-level BPE with HF `tokenizers`; ``vocab_size`` includes the nine specials.

    Raises ValueError when the corpus has too few distinct pairs to reach ``vocab_size``.
    """
    n_mergeable = vocab_size - len(SPECIAL_TOKENS)
    if n_mergeable < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + 9 specials), got {vocab_size}")
    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_mergeable,
        min_frequency=0,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        special_tokens=[],  # appended after the merges, as nanochat does
    )
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    got = backend.get_vocab_size()
    if got < n_mergeable:
        raise ValueError(
            f"corpus too small: BPE stopped at {got + len(SPECIAL_TOKENS)} tokens but vocab_size={vocab_size} was "
            f"requested (no pair left to merge). Train on more text (more files, a larger --max-chars / --doc-cap) "
            f"or lower --vocab-size."
        )
    return as_hf_tokenizer(tokenizer_from_ranks(_ranks_from_trained(backend), pattern))


# ----------------------------------------------------------------------------------------------------------------
# Encoding as nanochat does (special-token strings inside text stay ordinary text)

_ORDINARY = weakref.WeakKeyDictionary()


def _ordinary_backend(tokenizer: PreTrainedTokenizerFast) -> Tokenizer:
    # A private copy with encode_special_tokens=True: flipping the flag on the shared backend (what
    # `split_special_tokens=True` does) would race with other threads, e.g. Gradio workers.
    entry = _ORDINARY.get(tokenizer)
    if entry is None or entry[0] != len(tokenizer):
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.encode_special_tokens = True
        entry = (len(tokenizer), backend)
        _ORDINARY[tokenizer] = entry
    return entry[1]


def encode_ordinary(tokenizer: PreTrainedTokenizerFast, text: str | list[str]) -> list[int] | list[list[int]]:
    """nanochat's ``encode``: no BOS/EOS added and typed ``<|bos|>`` etc. encoded as plain bytes."""
    backend = _ordinary_backend(tokenizer)
    if isinstance(text, str):
        return backend.encode(text, add_special_tokens=False).ids
    if isinstance(text, list):
        return [e.ids for e in backend.encode_batch_fast(text, add_special_tokens=False)]
    raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")


def special_token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != token:
        raise ValueError(f"tokenizer has no special token {token!r}; use a nanochat tokenizer (recipes/tokenizer.py)")
    return tid


# ----------------------------------------------------------------------------------------------------------------
# token_bytes (for bits per byte), saving and loading


def compute_token_bytes(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """int32 [V]: number of raw bytes of each token, 0 for specials (nanochat's token_bytes.pt)."""
    backend = tokenizer.backend_tokenizer
    specials = set(tokenizer.all_special_ids) | {backend.token_to_id(t) for t in SPECIAL_TOKENS}
    out = torch.zeros(len(tokenizer), dtype=torch.int32)
    for i in range(len(tokenizer)):
        if i not in specials:
            out[i] = len(_token_raw_bytes(backend.id_to_token(i)))
    return out


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str, token_bytes: torch.Tensor | None = None) -> None:
    """Write tokenizer.json, tokenizer_config.json (chat template inside, class PreTrainedTokenizerFast so that
    transformers 4.x and TGI read it) and token_bytes.pt."""
    from modeling_nanochat.tokenizer.chat_format import CHAT_TEMPLATE

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    # a chat_template.jinja left by an earlier save (e.g. Trainer's, in transformers-5 form) would take precedence
    # over the template in tokenizer_config.json when transformers 5 loads the dir
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # v5 writes "TokenizersBackend", unknown to v4/TGI
    cfg["chat_template"] = tokenizer.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if token_bytes is None:
        token_bytes = compute_token_bytes(tokenizer)
    if token_bytes.shape != (len(tokenizer),):
        raise ValueError(f"token_bytes has shape {tuple(token_bytes.shape)}, expected ({len(tokenizer)},)")
    torch.save(token_bytes.to(torch.int32).cpu(), out / TOKEN_BYTES_FILE)


def load_token_bytes(directory: str, device: str | torch.device = "cpu") -> torch.Tensor:
    path = Path(directory) / TOKEN_BYTES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; it is written by save_tokenizer / recipes/tokenizer.py")
    return torch.load(path, map_location=device)


def token_bytes_of(directory: str, tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """The byte length of every token, for bits per byte: the directory's token_bytes.pt (nanochat's counts, kept
    as saved) or, for a tokenizer saved without one, computed from the tokenizer."""
    path = Path(directory) / TOKEN_BYTES_FILE
    if not path.exists():
        return compute_token_bytes(tokenizer)
    fix = f"delete {path} (it is then computed from the tokenizer) or re-save the tokenizer with save_tokenizer"
    try:
        token_bytes = load_token_bytes(directory)
    except Exception as e:  # torch.load's errors for a damaged file are RuntimeError, EOFError, UnpicklingError...
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e})", fix) from None
    if not isinstance(token_bytes, torch.Tensor) or tuple(token_bytes.shape) != (len(tokenizer),):
        shape = tuple(token_bytes.shape) if isinstance(token_bytes, torch.Tensor) else type(token_bytes).__name__
        raise DataError(f"{path} holds {shape}, not one count per token of this tokenizer ({len(tokenizer)},): it "
                        "belongs to another tokenizer", fix)
    return token_bytes


def load_tokenizer(directory: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(directory)


# ----------------------------------------------------------------------------------------------------------------
# Converting nanochat's tokenizer.pkl (a pickled tiktoken.Encoding)


def convert_nanochat_tokenizer(src_dir: str, out_dir: str | None = None) -> PreTrainedTokenizerFast:
    """Convert ``src_dir/tokenizer.pkl`` (+ ``token_bytes.pt`` if present) into our HF format, same ids."""
    pkl = os.path.join(src_dir, "tokenizer.pkl")
    if not os.path.exists(pkl):
        raise FileNotFoundError(f"{pkl} not found: point src_dir at nanochat's tokenizer dir ($NANOCHAT_BASE_DIR/tokenizer)")
    try:
        import tiktoken  # noqa: F401 - the pickle holds a tiktoken.Encoding; only needed here
    except ImportError as e:
        raise ImportError("converting tokenizer.pkl needs tiktoken: pip install tiktoken") from e
    with open(pkl, "rb") as f:
        enc = pickle.load(f)
    ranks = dict(enc._mergeable_ranks)
    expected = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
    if dict(enc._special_tokens) != expected:
        raise ValueError(f"{pkl} has special tokens {enc._special_tokens}, expected nanochat's {expected}")
    hf = as_hf_tokenizer(tokenizer_from_ranks(ranks, enc._pat_str))
    backend = hf.backend_tokenizer
    wrong = [r for b, r in ranks.items() if backend.token_to_id(_token_str(b)) != r]
    if wrong:
        raise RuntimeError(f"conversion changed the ids of {len(wrong)} tokens (e.g. {wrong[:5]})")

    token_bytes = compute_token_bytes(hf)
    tb_path = os.path.join(src_dir, TOKEN_BYTES_FILE)
    if os.path.exists(tb_path):
        theirs = torch.load(tb_path, map_location="cpu")
        if not torch.equal(theirs.to(torch.int32), token_bytes):
            # nanochat before #693 (2026-07-03) mis-counted non-UTF-8 tokens; keep theirs so bpb stays comparable
            n = int((theirs.to(torch.int32) != token_bytes).sum())
            logger.warning("token_bytes.pt differs from the raw byte counts in %d tokens; keeping the file's", n)
        token_bytes = theirs.to(torch.int32)
    if out_dir is not None:
        save_tokenizer(hf, out_dir, token_bytes)
    return hf


# ----------------------------------------------------------------------------------------------------------------
# Training corpus: any `datasets` source, cropped and capped like nanochat's tok_train.py

_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


def load_text_source(data: str, split: str = "train"):
    """A streaming `datasets` dataset for a hub id, a parquet/jsonl/txt file, or a directory of them.
    A .txt file is one document (it has no document boundaries); see ``iter_training_texts``."""
    from datasets import load_dataset

    path = Path(data)
    if path.exists():
        files = sorted(f for f in path.rglob("*") if f.suffix in _BUILDERS) if path.is_dir() else [path]
        builders = {_BUILDERS.get(f.suffix) for f in files}
        if not files or None in builders:
            raise ValueError(f"{data}: expected .parquet, .jsonl/.json or .txt files, found {[f.name for f in files][:5]}")
        if len(builders) > 1:
            raise ValueError(f"{data} mixes file types {sorted(builders)}; point --data at one kind")
        kwargs = {"sample_by": "document"} if builders == {"text"} else {}
        return load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train", streaming=True, **kwargs)
    if path.suffix in _BUILDERS or data.count("/") != 1 or data.startswith((".", "~", "/")):
        raise FileNotFoundError(f"{data} does not exist (and is not a hub id of the form owner/name)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise RuntimeError(f"{data!r} is not a local path and HF_HUB_OFFLINE=1: download it first or give a path")
    return load_dataset(data, split=split, streaming=True)


def iter_training_texts(dataset, text_column: str = "text", max_chars: int = 2_000_000_000, doc_cap: int = 10_000,
                        progress: bool = True):
    """Yield documents cropped to ``doc_cap`` chars until more than ``max_chars`` chars were yielded (nanochat's
    rule). Whole-file documents from .txt sources are cut into ``doc_cap`` pieces instead of cropped."""
    from tqdm.auto import tqdm

    whole_files = getattr(dataset, "info", None) is not None and dataset.info.builder_name == "text"
    bar = tqdm(total=max_chars if max_chars < 2**62 else None, unit="char", unit_scale=True, desc="reading corpus",
               disable=not progress)
    nchars = 0
    for row in dataset:
        if text_column not in row:
            raise KeyError(f"column {text_column!r} not in the data (columns: {sorted(row)}); pass --text-column")
        text = row[text_column] or ""
        docs = [text[i:i + doc_cap] for i in range(0, len(text), doc_cap)] if whole_files else [text[:doc_cap]]
        for doc in docs:
            nchars += len(doc)
            bar.update(len(doc))
            yield doc
            if nchars > max_chars:
                bar.close()
                return
    bar.close()
