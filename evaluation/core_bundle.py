"""The CORE eval bundle: where it lives, fetching it, and reading it with errors that name the file and line.

Layout (DCLM's, as nanochat ships it in eval_bundle.zip)::

    core.yaml               icl_tasks: [{label, dataset_uri, icl_task_type, num_fewshot: [k], continuation_delimiter}]
    eval_meta_data.csv      columns "Eval Task" and "Random baseline" (in percent)
    eval_data/<dataset_uri> one JSON object per line

Which examples are evaluated follows nanochat: each task file is shuffled with ``random.Random(1337)`` and then cut to
``max_per_task`` rows, so a subsample (and the few-shot picks made from it) is the one nanochat evaluates.
Unlike nanochat, every row is checked up front: a bad row stops the run before any model work, naming file:line.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from modeling_nanochat.utils.errors import NanochatError

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
SHUFFLE_SEED = 1337  # nanochat's: fixes which rows a --max-per-task subsample keeps
DEFAULT_DELIMITER = " "
# task type -> the fields each row must have
TASK_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


class BundleError(NanochatError):
    """The bundle is missing or malformed; the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str  # one of TASK_FIELDS
    num_fewshot: int
    delimiter: str  # continuation_delimiter, between context and continuation
    random_baseline: float  # percent, from eval_meta_data.csv
    data_path: Path
    where: str  # "core.yaml:LINE" of the task's entry, for error messages


@dataclass(frozen=True)
class Row:
    data: dict
    where: str  # "file:line"


# ----------------------------------------------------------------------------------------------------------------
# locating and downloading


def default_bundle_dir() -> Path:
    """nanochat's location, so a bundle nanochat already downloaded is reused: $NANOCHAT_BASE_DIR/eval_bundle."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    return Path(base) / "eval_bundle"


def ensure_bundle(bundle_dir: str | os.PathLike | None = None) -> Path:
    """The bundle directory; downloaded from nanochat's URL into it when it does not exist."""
    path = Path(bundle_dir) if bundle_dir is not None else default_bundle_dir()
    if not path.exists():
        download_bundle(path)
    return path


def _offline_var() -> str | None:
    return next((v for v in _OFFLINE_VARS if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")), None)


def download_bundle(dest: Path, url: str = EVAL_BUNDLE_URL, timeout: float = 30.0) -> Path:
    """Fetch and unzip eval_bundle.zip into `dest` atomically; a file lock lets every rank call this at once."""
    from filelock import FileLock
    from tqdm.auto import tqdm

    manual = (f"download {url} elsewhere, unzip it and pass --bundle DIR (the folder with core.yaml), "
              f"or place it at {dest}")
    if (var := _offline_var()) is not None:
        raise BundleError(f"the CORE eval bundle {dest} does not exist and {var} is set, so it is not downloaded: "
                          f"{manual}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if dest.exists():  # another process finished the download while we waited
            return dest
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".eval_bundle.") as tmp:
            archive = Path(tmp) / "eval_bundle.zip"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(archive, "wb") as f, \
                        tqdm(total=int(resp.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                             desc="eval_bundle.zip") as bar:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
                with zipfile.ZipFile(archive) as z:  # extractall keeps members inside tmp ("..", absolute paths)
                    z.extractall(Path(tmp) / "x")
            except (urllib.error.URLError, OSError, zipfile.BadZipFile) as e:
                raise BundleError(f"could not fetch the CORE eval bundle from {url}: {e}. Offline: {manual}") from e
            found = sorted(Path(tmp, "x").rglob("core.yaml"))
            if not found:
                raise BundleError(f"{url} has no core.yaml inside; {manual}")
            shutil.move(str(found[0].parent), str(dest))
    return dest


# ----------------------------------------------------------------------------------------------------------------
# reading


def _yaml_entries(path: Path) -> list[tuple[int, object]]:
    """(line, entry) for each item of icl_tasks; lines come from the YAML node tree."""
    text = path.read_text(encoding="utf-8")
    try:
        root, data = yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise BundleError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("icl_tasks"), list) or not data["icl_tasks"]:
        raise BundleError(f"{path}: expected a top-level key icl_tasks with a list of tasks (nanochat's core.yaml)")
    seq = next(v for k, v in root.value if k.value == "icl_tasks")
    return [(node.start_mark.line + 1, entry) for node, entry in zip(seq.value, data["icl_tasks"])]


def _read_baselines(path: Path) -> dict[str, float]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"Eval Task", "Random baseline"} - set(reader.fieldnames or ())
        if missing:
            raise BundleError(f"{path}:1: header lacks the column(s) {sorted(missing)}")
        out = {}
        for row in reader:
            task, value = row["Eval Task"], row["Random baseline"]
            try:
                baseline = float(value)
            except (TypeError, ValueError):
                raise BundleError(f"{path}:{reader.line_num}: Random baseline {value!r} of {task!r} is not a number") \
                    from None
            if not 0 <= baseline < 100:
                raise BundleError(f"{path}:{reader.line_num}: Random baseline {baseline} of {task!r} is not in "
                                  "[0, 100)")
            out[task] = baseline
    return out


def _task_from_entry(entry, where: str, data_root: Path, baselines: dict[str, float], csv_path: Path) -> CoreTask:
    if not isinstance(entry, dict):
        raise BundleError(f"{where}: a task must be a mapping with label, dataset_uri, icl_task_type, num_fewshot")
    missing = [k for k in ("label", "dataset_uri", "icl_task_type", "num_fewshot") if k not in entry]
    if missing:
        raise BundleError(f"{where}: task lacks {missing}")
    label, task_type = str(entry["label"]), entry["icl_task_type"]
    if task_type not in TASK_FIELDS:
        raise BundleError(f"{where}: task {label!r} has unknown icl_task_type {task_type!r}",
                          f"set it to one of the types CORE knows ({', '.join(TASK_FIELDS)}), or remove the task "
                          "from core.yaml")
    shots = entry["num_fewshot"]
    shots = shots[0] if isinstance(shots, list) and shots else shots  # DCLM lists it; nanochat uses the first
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise BundleError(f"{where}: task {label!r}: num_fewshot must be [k] with k >= 0, got {entry['num_fewshot']!r}")
    delimiter = entry.get("continuation_delimiter", DEFAULT_DELIMITER)
    if not isinstance(delimiter, str):
        raise BundleError(f"{where}: task {label!r}: continuation_delimiter must be a string")
    data_path = data_root / str(entry["dataset_uri"])
    if not data_path.is_file():
        raise BundleError(f"{where}: task {label!r}: data file {data_path} is missing",
                          f"restore it from nanochat's bundle ({EVAL_BUNDLE_URL}), correct dataset_uri (relative to "
                          f"{data_root}), or remove the task from core.yaml")
    if label not in baselines:
        raise BundleError(f"{csv_path}: no row for task {label!r} (named at {where}); add its Random baseline")
    return CoreTask(label, task_type, shots, delimiter, baselines[label], data_path, where)


def load_bundle(bundle_dir: str | os.PathLike, tasks: list[str] | None = None) -> list[CoreTask]:
    """The tasks of core.yaml (in its order, or only `tasks`), checked against the csv and the data files."""
    root = Path(bundle_dir)
    yaml_path, csv_path, data_root = root / "core.yaml", root / "eval_meta_data.csv", root / "eval_data"
    for p in (yaml_path, csv_path):
        if not p.is_file():
            raise BundleError(f"{p} is missing: a CORE bundle holds core.yaml, eval_meta_data.csv and eval_data/ "
                              f"(nanochat's {EVAL_BUNDLE_URL})")
    baselines = _read_baselines(csv_path)
    out, seen = [], {}
    for line, entry in _yaml_entries(yaml_path):
        task = _task_from_entry(entry, f"{yaml_path}:{line}", data_root, baselines, csv_path)
        if task.label in seen:
            raise BundleError(f"{task.where}: task {task.label!r} is already defined at {seen[task.label]}")
        seen[task.label] = task.where
        out.append(task)
    if tasks:
        unknown = [t for t in tasks if t not in seen]
        if unknown:
            raise BundleError(f"unknown task(s) {unknown}; {yaml_path} has {list(seen)}")
        out = [t for t in out if t.label in set(tasks)]
    return out


def _is_text(v) -> bool:
    return isinstance(v, (str, int, float)) and not isinstance(v, bool)


def _check_row(row, task_type: str, where: str) -> None:
    if not isinstance(row, dict):
        raise BundleError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in TASK_FIELDS[task_type] if k not in row]
    if missing:
        raise BundleError(f"{where}: a {task_type} row needs {list(TASK_FIELDS[task_type])}; missing {missing}")
    options_key = {"multiple_choice": "choices", "schema": "context_options"}.get(task_type)
    texts = [k for k in ("query", "context", "continuation") if k in TASK_FIELDS[task_type]]
    for k in texts:
        if not _is_text(row[k]):
            raise BundleError(f"{where}: {k!r} must be a string, got {type(row[k]).__name__}")
    if options_key is not None:
        options = row[options_key]
        if not isinstance(options, list) or not options or not all(_is_text(o) for o in options):
            raise BundleError(f"{where}: {options_key!r} must be a non-empty list of strings")
        gold = row["gold"]
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
            raise BundleError(f"{where}: 'gold' must be an index into the {len(options)} {options_key}, got {gold!r}")


def load_rows(task: CoreTask, max_per_task: int = -1) -> list[Row]:
    """The rows nanochat evaluates: all rows, shuffled with Random(1337), cut to max_per_task when > 0.
    Blank lines are skipped (nanochat would stop on them); anything else that is not a valid row raises."""
    from modeling_nanochat.data.files import read_lines

    rows = []
    for lineno, line in read_lines(task.data_path):  # bytes that are not UTF-8: DataError naming file:line
        if not line.strip():
            continue
        where = f"{task.data_path}:{lineno}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise BundleError(f"{where}: not valid JSON ({e.msg}, column {e.colno})",
                              "repair or delete that line: each line is one JSON object") from None
        _check_row(data, task.task_type, where)
        rows.append(Row(data, where))
    random.Random(SHUFFLE_SEED).shuffle(rows)
    if max_per_task > 0:
        rows = rows[:max_per_task]
    if task.num_fewshot and len(rows) <= task.num_fewshot:
        raise BundleError(f"{task.where}: task {task.label!r} has {len(rows)} rows to evaluate but needs at least "
                          f"{task.num_fewshot + 1} for {task.num_fewshot}-shot prompts; raise --max-per-task")
    if not rows:
        raise BundleError(f"{task.data_path}: no rows")
    return rows
