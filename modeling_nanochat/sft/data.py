"""nanochat's SFT data mixture (NANOCHAT_REFERENCE §5.4) through `datasets`, rendered to nanochat's tokens.

Train mixture, in nanochat's task order:

* SmolTalk (``HuggingFaceTB/smol-smoltalk``, train): messages as they are (a leading system message is allowed);
* the user's JSONL conversations (``extra_jsonl``, each ``PATH[:epochs]``), where nanochat's identity conversations
  sat until 2026-07 (right after SmolTalk, 2 epochs); one conversation per line, either nanochat's CustomJSON form
  (a JSON array of messages) or ``{"messages": [...]}``; assistant content may be a list of parts, so tool calls
  (``python`` / ``python_output``) can be taught too;
* MMLU auxiliary_train (``cais/mmlu``, "all") x ``mmlu_epochs`` (3): nanochat's multiple-choice prompt, answer = letter;
* GSM8K train (``openai/gsm8k``, "main") x ``gsm8k_epochs`` (4): ``<<expr=result>>`` becomes a python call and its
  output (evaluation.tasks.gsm8k.solution_parts, the same conversion the GSM8K evaluation uses).

Val mixture: SmolTalk test, the first 5,200 MMLU test rows, the first 420 GSM8K test rows (after the shuffle below).

Order, as nanochat: each Hub source is shuffled with ``Dataset.shuffle(seed=42)`` (which is
``np.random.default_rng(42).permutation``, what nanochat applies to the Hub's parquet export) and every epoch of a
source repeats that order (nanochat instantiates the task again); JSONL files keep their line order (CustomJSON did
not shuffle). Then the flattened list of (source, row) pairs is shuffled with ``random.Random(42)`` (TaskMixture).

Rows come from the Hub (``datasets.load_dataset``; offline or unreachable -> a clear error at once) or, with
``data_dir``, from local files in the Hub formats: ``<data_dir>/<source>/`` holding a download of the Hub repo
(``huggingface-cli download --repo-type dataset cais/mmlu --local-dir DATA/mmlu``: ``all/auxiliary_train-*.parquet``)
or ``<split>.jsonl`` / ``<split>.parquet`` (e.g. ``DATA/gsm8k/train.jsonl``).

Every conversation is rendered once with ``chat_format.render_conversation`` (nanochat's tokens and loss mask) by
``Dataset.map``, which caches the result on disk, so packing can plan from the lengths and a rerun starts at once.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modeling_nanochat.data.files import NOT_JSON_FIX, load_files, read_lines
from modeling_nanochat.tokenizer.chat_format import PART_TYPES, normalize_messages, render_conversation
from modeling_nanochat.utils.errors import DataError, NanochatError

MIXTURE_SEED = 42  # random.Random(42) over the flattened mixture (nanochat's TaskMixture)
VAL_LIMITS = {"mmlu": 5200, "gsm8k": 420}  # nanochat's val mixture takes the first rows of these (after the shuffle)
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


# ---------------------------------------------------------------------------------------------------------------------
# Rows -> conversations


def smoltalk_conversation(row: dict) -> dict:
    return {"messages": row["messages"]}


def mmlu_conversation(row: dict) -> dict:
    from evaluation.tasks.mmlu import MMLU

    return _EvalTask.conversation(MMLU, row)


def gsm8k_conversation(row: dict) -> dict:
    from evaluation.tasks.gsm8k import GSM8K

    return _EvalTask.conversation(GSM8K, row)


class _EvalTask:
    """The evaluation package's task classes turn rows into conversations; only that method is used here (their
    constructors load the eval split, which SFT does not want)."""

    _instances: dict = {}

    @classmethod
    def conversation(cls, task_cls, row: dict) -> dict:
        task = cls._instances.get(task_cls)
        if task is None:
            task = cls._instances[task_cls] = object.__new__(task_cls)
        conv = task.conversation(row)
        return {"messages": conv["messages"]}  # letters/subject are for grading, not training


def jsonl_conversation(row: dict) -> dict:
    return parse_conversation(json.loads(row["conversation"]))


CONVERSATION_FORM = ('[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...] (or '
                     '{"messages": [...]}), roles alternating user/assistant after one optional first system message, '
                     'ending with the assistant')


def parse_conversation(obj) -> dict:
    """A JSONL line's conversation: nanochat's CustomJSON array of messages, or ``{"messages": [...]}``, checked as
    training data (DataError): the renderer's rules (roles, contents, part types), no empty assistant turn, and tool
    parts in the order the model produces them (each ``python_output`` right after its ``python`` call)."""
    if isinstance(obj, list):
        obj = {"messages": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise DataError('expected a JSON array of messages or an object {"messages": [...]}',
                        f"write each conversation on one line as {CONVERSATION_FORM}")
    msgs = normalize_messages(obj)  # roles alternate user/assistant, contents are strings or assistant part lists
    if msgs[-1]["role"] != "assistant":
        raise DataError("the last message must be the assistant's (there is nothing to learn otherwise)",
                        "end the conversation with the assistant's reply, or drop its trailing user message")
    offset = len(obj["messages"]) - len(msgs)  # a leading system message was merged into the first user message
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            _check_assistant_turn(i + offset, m["content"])
    return {"messages": obj["messages"]}


def _check_assistant_turn(i: int, content) -> None:
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not any(p["text"].strip() for p in parts if p["type"] != "python_output"):
        raise DataError(f"assistant message {i} is empty: it would teach the model to answer with nothing",
                        "write the assistant's reply, or delete the conversation")
    for j, part in enumerate(parts):
        if part["type"] == "python_output" and (j == 0 or parts[j - 1]["type"] != "python"):
            before = "it is the first part" if j == 0 else f"it follows a {parts[j - 1]['type']!r} part"
            raise DataError(f"assistant message {i}, part {j}: a 'python_output' part must come right after the "
                            f"'python' call that produced it, but {before}",
                            "order the parts as the model produces them: ... {'type': 'python', ...}, "
                            "{'type': 'python_output', ...} ... (part types: " + ", ".join(PART_TYPES) + ")")


@dataclass(frozen=True)
class Source:
    name: str  # also the folder under data_dir
    repo: str
    subset: str
    splits: dict  # "train" / "val" -> the Hub split
    columns: tuple
    to_conversation: Callable[[dict], dict]


SOURCES = {
    "smoltalk": Source("smoltalk", "HuggingFaceTB/smol-smoltalk", "default", {"train": "train", "val": "test"},
                       ("messages",), smoltalk_conversation),
    "mmlu": Source("mmlu", "cais/mmlu", "all", {"train": "auxiliary_train", "val": "test"},
                   ("question", "choices", "answer"), mmlu_conversation),
    "gsm8k": Source("gsm8k", "openai/gsm8k", "main", {"train": "train", "val": "test"},
                    ("question", "answer"), gsm8k_conversation),
}


# ---------------------------------------------------------------------------------------------------------------------
# Loading rows


def local_source_files(data_dir: str | os.PathLike, source: Source, split: str) -> list[Path]:
    """Files of ``source``'s ``split`` under ``<data_dir>/<source.name>/``: ``<split>.jsonl|.json|.parquet``,
    ``<split>-*.parquet`` (a Hub repo download, preferring its ``<subset>/`` folder) or ``<split>/*.parquet`` (the Hub's
    parquet export)."""
    root = Path(data_dir) / source.name
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: data_dir must hold one folder per source "
                                f"({', '.join(SOURCES)}) with files in the Hub dataset's format")
    files = sorted(f for f in root.rglob("*") if f.suffix in _BUILDERS and f.is_file()
                   and (f.stem == split or f.name.startswith(f"{split}-") or f.parent.name == split))
    preferred = [f for f in files if source.subset in f.relative_to(root).parts[:-1]]
    files = preferred or files
    if not files:
        raise FileNotFoundError(f"no {split} files for {source.name} under {root}: expected {split}.jsonl, "
                                f"{split}.parquet or a download of {source.repo} ({source.subset}/{split}-*.parquet)")
    if len({_BUILDERS[f.suffix] for f in files}) > 1:
        raise ValueError(f"{root} mixes file types for the {split} split: {[f.name for f in files]}")
    return files


def load_source_rows(source: Source, split: str, data_dir: str | os.PathLike | None = None):
    """The raw rows of one source and split (a ``datasets.Dataset``, not shuffled), checked for their columns."""
    hub_split = source.splits[split]
    if data_dir is not None:
        files = local_source_files(data_dir, source, hub_split)
        rows = load_files(_BUILDERS[files[0].suffix], files)  # a broken file: DataError naming the file and line
        where = ", ".join(str(f) for f in files[:3])
    else:
        from evaluation.tasks.common import HubSource, load_hub_rows

        try:
            rows = load_hub_rows(HubSource(source.repo, source.subset, hub_split))
        except RuntimeError as e:  # offline or unreachable: say how SFT takes local files instead
            reason = str(e).split(": pass --data")[0]
            folders = ", ".join(f"{name}/" for name in SOURCES)
            raise RuntimeError(f"{reason}: pass data_dir (--data_dir DIR) holding {folders} folders of local files "
                               "in the Hub datasets' formats (see modeling_nanochat/sft/data.py)") from e
        where = f"{source.repo} ({source.subset}, {hub_split})"
    missing = [c for c in source.columns if c not in rows.column_names]
    if missing:
        raise DataError(f"{where}: missing columns {missing} of the {source.repo} format (found {rows.column_names})",
                        f"give every row the fields {list(source.columns)} (the {source.repo} format)")
    return rows


def parse_extra_jsonl(spec: str) -> tuple[str, int]:
    """``PATH[:epochs]`` -> (path, epochs); epochs default 1."""
    path, sep, epochs = spec.rpartition(":")
    if sep and epochs.isdigit() and path:
        return path, int(epochs)
    return spec, 1


def load_jsonl_rows(path: str | os.PathLike):
    """A conversations JSONL file as a one-column ``datasets.Dataset`` (``conversation``: the line), validated line by
    line first so that a bad line is reported with its number. Kept as text: assistant contents mix strings and part
    lists, which one Arrow column type cannot hold."""
    from datasets import Dataset

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversations file {path} not found (--extra-jsonl PATH[:epochs])")
    lines = []
    for number, line in read_lines(path):  # bytes that are not UTF-8: DataError naming path:line
        if not line.strip():
            continue
        try:
            parse_conversation(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})",
                            f"{NOT_JSON_FIX}; each line is one conversation: {CONVERSATION_FORM}") from None
        except NanochatError as e:
            raise DataError(f"{path}:{number}: {e.problem}", e.fix) from None
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{number}: {e}", f"write each conversation as {CONVERSATION_FORM}") from None
        lines.append(line)
    if not lines:
        raise DataError(f"{path} holds no conversations (it is empty)",
                        f"write one conversation per line: {CONVERSATION_FORM}")
    return Dataset.from_dict({"conversation": lines})


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def _render_batch(batch: dict, indices: list[int], *, tokenizer, to_conversation, max_tokens: int, label: str) -> dict:
    out = {"input_ids": [], "mask": [], "length": []}
    for j, index in enumerate(indices):
        row = {k: v[j] for k, v in batch.items()}
        try:
            ids, mask = render_conversation(tokenizer, to_conversation(row), max_tokens=max_tokens)
        except NanochatError as e:
            raise DataError(f"{label} row {index}: {e.problem}", e.fix) from e
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{label} row {index}: {e}", "fix or drop that row of the source") from e
        out["input_ids"].append(ids)
        out["mask"].append(mask)
        out["length"].append(len(ids))
    return out


def render_rows(rows, tokenizer, to_conversation: Callable[[dict], dict], *, max_tokens: int = 2048,
                label: str = "rows", num_proc: int | None = None):
    """``rows`` rendered to ``input_ids`` / ``mask`` (1 = supervised) / ``length`` columns, one row per conversation."""
    from datasets import Features, Sequence as Seq, Value

    features = Features({"input_ids": Seq(Value("int32")), "mask": Seq(Value("int8")), "length": Value("int32")})
    return rows.map(_render_batch, batched=True, with_indices=True, remove_columns=rows.column_names,
                    features=features, num_proc=num_proc, desc=f"rendering {label}",
                    fn_kwargs=dict(tokenizer=tokenizer, to_conversation=to_conversation, max_tokens=max_tokens,
                                   label=label))


# ---------------------------------------------------------------------------------------------------------------------
# The mixture


class SFTMixture:
    """Rendered conversations in nanochat's TaskMixture order.

    ``parts`` lists (name, rendered dataset) once per epoch, in task order; ``mixture[i]`` is ``(ids, mask)`` of the
    i-th conversation after the seed-42 shuffle of the flattened (part, row) list; ``lengths`` are their token counts
    in that order (what the packer plans with)."""

    def __init__(self, parts: Sequence[tuple[str, object]], seed: int = MIXTURE_SEED):
        if not parts:
            raise ValueError("the SFT mixture is empty: give at least one source or --extra-jsonl file")
        self.parts = list(parts)
        sizes = [len(d) for _, d in self.parts]
        self.offsets = np.cumsum([0] + sizes)
        order = list(range(int(self.offsets[-1])))
        random.Random(seed).shuffle(order)  # the same permutation nanochat's shuffle gives its (task, row) list
        self.order = np.asarray(order, dtype=np.int64)
        lengths, cache = [], {}
        for _, d in self.parts:
            if id(d) not in cache:
                cache[id(d)] = np.asarray(d["length"], dtype=np.int64)
            lengths.append(cache[id(d)])
        self.lengths = np.concatenate(lengths)[self.order] if lengths else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.order)

    def locate(self, index: int) -> tuple[int, int]:
        """(part, row within the part) of mixture position ``index``."""
        flat = int(self.order[index])
        part = int(np.searchsorted(self.offsets, flat, side="right")) - 1
        return part, flat - int(self.offsets[part])

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        part, row = self.locate(index)
        item = self.parts[part][1][row]
        return item["input_ids"], item["mask"]

    def describe(self) -> str:
        counts = {}
        for name, d in self.parts:
            n, epochs = counts.get(name, (len(d), 0))
            counts[name] = (n, epochs + 1)
        pieces = [f"{name} {n:,}" + (f" x{e}" if e > 1 else "") for name, (n, e) in counts.items()]
        return f"{len(self):,} conversations ({', '.join(pieces)})"


def mixture_parts(tokenizer, split: str = "train", *, data_dir=None, mmlu_epochs: int = 3, gsm8k_epochs: int = 4,
                  smoltalk_epochs: int = 1, extra_jsonl: Sequence[str] = (), max_tokens: int = 2048,
                  num_proc: int | None = None, convert: Callable | None = None) -> list[tuple[str, object]]:
    """The (name, rendered dataset) parts of nanochat's train or val mixture, one entry per epoch, in task order:
    SmolTalk, the JSONL files (train only; where nanochat's identity set sat), MMLU, GSM8K.

    ``convert(rows, to_conversation, label, num_proc)`` turns a source's rows into the part's dataset; the default
    renders them with ``render_rows`` (the stock-TRL data script passes one that writes `messages` instead)."""
    if convert is None:
        def convert(rows, to_conversation, label, num_proc):
            return render_rows(rows, tokenizer, to_conversation, max_tokens=max_tokens, label=label,
                               num_proc=num_proc)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    epochs = {"smoltalk": smoltalk_epochs, "mmlu": mmlu_epochs, "gsm8k": gsm8k_epochs}
    if split == "val":
        epochs, extra_jsonl = dict.fromkeys(epochs, 1), ()
    for name, n in epochs.items():
        if n < 0:
            raise ValueError(f"{name} epochs must be >= 0, got {n}")

    def hub_part(name: str) -> list:
        if epochs[name] == 0:
            return []
        source = SOURCES[name]
        rows = load_source_rows(source, split, data_dir)
        # rendered in file order (the cache key does not depend on the shuffle), then put in nanochat's order
        rendered = convert(rows, source.to_conversation, f"{name} {source.splits[split]}",
                           num_proc).shuffle(seed=MIXTURE_SEED)
        if split == "val" and name in VAL_LIMITS:
            rendered = rendered.select(range(min(VAL_LIMITS[name], len(rendered))))
        return [(name, rendered)] * epochs[name]

    def jsonl_part(spec: str) -> list:
        path, n = parse_extra_jsonl(spec)
        rendered = convert(load_jsonl_rows(path), jsonl_conversation, os.path.basename(path), None)
        return [(os.path.basename(path), rendered)] * n

    parts = hub_part("smoltalk")
    for spec in extra_jsonl:
        parts += jsonl_part(spec)
    return parts + hub_part("mmlu") + hub_part("gsm8k")


def build_sft_mixture(tokenizer, split: str = "train", **kwargs) -> SFTMixture:
    """nanochat's SFT train or val mixture, rendered (see the module docstring; kwargs as ``mixture_parts``)."""
    return SFTMixture(mixture_parts(tokenizer, split, **kwargs))


__all__ = ["SFTMixture", "build_sft_mixture", "mixture_parts", "SOURCES", "Source", "load_source_rows",
           "local_source_files", "load_jsonl_rows", "jsonl_conversation", "parse_extra_jsonl", "parse_conversation",
           "render_rows", "smoltalk_conversation", "mmlu_conversation", "gsm8k_conversation", "MIXTURE_SEED",
           "VAL_LIMITS"]
