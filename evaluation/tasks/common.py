"""What every ChatCORE task shares: where its rows come from, nanochat's row order, and the task interface.

A task turns dataset rows into nanochat conversations (``{"messages": [...], ...}``) and grades a model's answer.
Rows come from the Hub dataset nanochat uses (``datasets.load_dataset``) or from local files in that dataset's
format. Like nanochat, every task is shuffled with seed 42 before use, so ``--limit N`` picks the same N problems
nanochat's ``--max-problems N`` does (``Dataset.shuffle(seed=42)`` is ``np.random.default_rng(42).permutation``,
which is what nanochat's own loader applies to the Hub's parquet export).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from modeling_nanochat.utils.errors import DataError

SHUFFLE_SEED = 42
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


@dataclass(frozen=True)
class HubSource:
    repo: str  # e.g. "allenai/ai2_arc"
    subset: str  # the dataset config, e.g. "ARC-Easy"; also the folder name in a download of the repo
    split: str


class ChatTask:
    """Base class: subclasses set the class attributes and implement ``conversation`` and ``evaluate``."""

    name: str  # CLI name, e.g. "arc_easy"
    title: str  # nanochat's name, e.g. "ARC-Easy"
    eval_type: str  # "categorical" (letter logits) or "generative" (sampling)
    baseline: float  # accuracy of random guessing, for the centered score
    source: HubSource
    columns: tuple[str, ...]  # columns a row must have

    def __init__(self, data: str | os.PathLike | None = None, source: HubSource | None = None):
        if source is not None:
            self.source = source
        self.rows = load_rows(self, data).shuffle(seed=SHUFFLE_SEED)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.conversation(self.rows[index])

    def check_rows(self, rows, locate) -> None:
        """Raise a DataError for a row the task cannot use; ``locate(i)`` names row ``i`` ("file:line"). Called
        once on the loaded rows, in file order, before the shuffle. Subclasses override it."""

    def conversation(self, row: dict) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, response: str) -> bool:
        raise NotImplementedError

    def reward(self, conversation: dict, response: str) -> float:
        """RL reward (nanochat uses the evaluation outcome as is)."""
        return float(self.evaluate(conversation, response))


def render_mc(question: str, letters, choices) -> str:
    """nanochat's multiple-choice prompt. The letter comes *after* each choice and right after "=" with no space,
    so that the prompt holds the very token the assistant answers with ("A", not " A")."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


# ----------------------------------------------------------------------------------------------------------------
# Loading


def local_files(task: ChatTask, data: str | os.PathLike) -> list[Path]:
    """Files holding ``task``'s rows under ``data``: the file itself; or, in a directory, ``<task>.jsonl|.json|
    .parquet``, or a folder ``<task>/``, or the folder of a Hub download (``<subset>/<split>-*.parquet`` as in the
    repo, ``<subset>/<split>/*.parquet`` as in the Hub's parquet export)."""
    path = Path(data)
    if path.is_file():
        return [_checked_suffix(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"--data {path} does not exist")
    for suffix in _BUILDERS:
        if (path / f"{task.name}{suffix}").is_file():
            return [path / f"{task.name}{suffix}"]
    own = path / task.name
    if own.is_dir():
        files = sorted(f for f in own.rglob("*") if f.suffix in _BUILDERS)
        if files:
            return files
    hub = path / task.source.subset
    if hub.is_dir():
        split = task.source.split
        files = sorted(f for f in hub.rglob("*") if f.suffix in _BUILDERS
                       and (f.name.startswith(f"{split}-") or f.parent.name == split))
        if files:
            return files
    raise FileNotFoundError(
        f"no {task.title} data under {path}: expected {task.name}.jsonl / {task.name}.parquet, a folder "
        f"{task.name}/, or a download of {task.source.repo} with {task.source.subset}/{task.source.split}-*.parquet"
    )


def _checked_suffix(path: Path) -> Path:
    if path.suffix not in _BUILDERS:
        raise DataError(f"{path}: unknown file type {path.suffix!r}",
                        "give a .jsonl, .json or .parquet file in the Hub dataset's format")
    return path


def load_rows(task: ChatTask, data: str | os.PathLike | None = None):
    """The task's rows as a `datasets.Dataset` (not shuffled), checked for the columns the task reads."""
    from modeling_nanochat.data.files import load_files, row_location

    if data is not None:
        files = local_files(task, data)
        builders = {_BUILDERS[f.suffix] for f in files}
        if len(builders) > 1:
            raise DataError(f"{data} mixes file types for {task.title}: {[f.name for f in files]}",
                            "keep one kind of file (.jsonl, .json or .parquet) per task")
        # a file that is not UTF-8, a line that is not JSON, an empty file: DataError naming the file and line
        rows = load_files(builders.pop(), files)
        where = ", ".join(str(f) for f in files[:3])

        def locate(i):
            return row_location(files, i)
    else:
        rows = load_hub_rows(task.source)
        where = f"{task.source.repo} ({task.source.subset}, {task.source.split})"

        def locate(i):
            return f"{where} row {i + 1}"
    missing = [c for c in task.columns if c not in rows.column_names]
    if missing:
        raise DataError(f"{where}: missing columns {missing} of the {task.source.repo} format "
                        f"(found {rows.column_names})", f"give every row the fields {list(task.columns)}")
    if len(rows) == 0:
        raise DataError(f"{where}: no rows", f"point --data at {task.title} problems")
    task.check_rows(rows, locate)
    return rows


def load_hub_rows(source: HubSource):
    """``load_dataset(repo, subset, split)``, failing at once with a clear message when the Hub is unreachable
    (``datasets`` would otherwise retry for ~20 s before an obscure error)."""
    from datasets import load_dataset
    from huggingface_hub import constants, dataset_info
    from huggingface_hub.errors import HfHubHTTPError

    hint = "pass --data PATH with local files in the Hub dataset's format (see `python -m evaluation.chat --help`)"
    if constants.HF_HUB_OFFLINE:
        try:  # offline mode still reads a copy `datasets` cached earlier
            return load_dataset(source.repo, source.subset, split=source.split)
        except Exception as e:
            raise RuntimeError(f"{source.repo} is not in the local cache and HF_HUB_OFFLINE=1: {hint}") from e
    try:
        dataset_info(source.repo, timeout=10)
    except HfHubHTTPError:
        pass  # the Hub answered (e.g. gated repo, needs a token): load_dataset gives the precise error
    except Exception as e:
        raise RuntimeError(f"cannot reach the Hub for {source.repo} ({type(e).__name__}: {e}): {hint}; "
                           "or set HF_HUB_OFFLINE=1 to use a copy in the local `datasets` cache") from e
    return load_dataset(source.repo, source.subset, split=source.split)
