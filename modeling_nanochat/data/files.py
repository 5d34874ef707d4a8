"""A user's local data files, read with errors that name the file and the line at fault (`DataError`).

* ``read_lines(path)``: (line number, text) of a UTF-8 file; bytes that are not UTF-8 stop at ``path:line``.
* ``read_json_lines(path)``: (line number, object) of a .jsonl file; blank lines skipped, a line that is not JSON
  stops at ``path:line``.
* ``load_files(builder, files)``: ``datasets.load_dataset(builder, data_files=files, split="train")``. `datasets`
  reports a broken file as ``DatasetGenerationError: An error occurred while generating the dataset`` (or a bare
  ``StopIteration`` for an empty .jsonl): when loading fails, each file is examined (``diagnose``) and the problem
  found is raised as a `DataError` naming the file, the line and the fix. Nothing is read twice for good data.
* ``diagnose_files(files)``: the same examination for a reader that failed elsewhere (a streamed corpus).
* ``first_text(texts)``: the first document with non-whitespace text, to refuse an empty corpus before training.
* ``row_location(files, index)``: ``path:line`` of the ``index``-th row of a single .jsonl file (for row checks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from modeling_nanochat.utils.errors import DataError

BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
NOT_UTF8_FIX = ("save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`), or remove the bytes "
                "that are not text")
NOT_JSON_FIX = "a .jsonl file holds one complete JSON object per line: repair or delete that line"


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number from 1, text with its newline) of a UTF-8 text file; DataError at the first line that is not
    UTF-8, naming ``path:line`` and the byte."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                "of the line)", NOT_UTF8_FIX) from None


def read_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of each non-blank line of a .jsonl file; DataError naming ``path:line`` for a line
    that is not UTF-8 or not JSON."""
    for number, line in read_lines(path):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})", NOT_JSON_FIX) from None


def empty_file_error(path, what: str = "rows") -> DataError:
    return DataError(f"{path} is empty: it holds no {what}",
                     "point at a file with data (did a download or export fail?), or remove the empty file")


def diagnose(path: str | os.PathLike) -> DataError | None:
    """Why `datasets` cannot read ``path`` (a .jsonl/.json/.txt/.parquet file), as a DataError naming the file and
    line; None when no problem is found. Reads the whole file: meant for when loading already failed."""
    path = Path(path)
    kind = BUILDERS.get(path.suffix)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            try:
                meta = pq.read_metadata(path)
            except Exception as e:  # pyarrow raises ArrowInvalid & co. for a truncated or foreign file
                return DataError(f"{path} is not a readable parquet file ({e})",
                                 "write it again (or download it again); a .parquet file must be Apache Parquet")
            return empty_file_error(path) if meta.num_rows == 0 else None
        if kind == "text":
            has_text = False
            for _, line in read_lines(path):
                has_text = has_text or bool(line.strip())
            return None if has_text else empty_file_error(path, "text" if path.stat().st_size == 0 else
                                                          "text, only whitespace")
        if kind == "json":
            if path.suffix == ".json" and _whole_json(path):
                return None  # one JSON document (a list of rows): not a jsonl problem
            rows = 0
            for number, obj in read_json_lines(path):
                if not isinstance(obj, dict):
                    return DataError(f"{path}:{number}: a JSON {type(obj).__name__} where a row (a JSON object "
                                     "{...}) is expected", "write one JSON object per line")
                rows += 1
            return None if rows else empty_file_error(path)
    except DataError as e:
        return e
    return None


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes().decode("utf-8"))
        return True
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False


def load_files(builder: str, files: Iterable[str | os.PathLike], **kwargs):
    """``datasets.load_dataset(builder, data_files=files, split="train", **kwargs)``; when it fails, the DataError
    that names the file (and line) at fault, if one of the files explains the failure (else the original error)."""
    from datasets import load_dataset

    files = [Path(f) for f in files]
    try:
        with _quiet_datasets():
            dataset = load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
        if builder == "json":  # pyarrow's JSON reader keeps bytes that are not UTF-8; reading the row would fail
            dataset.data.table.validate(full=True)  # checks every string's UTF-8 (C++, on the memory-mapped cache)
        return dataset
    except Exception as e:  # DatasetGenerationError, StopIteration, ArrowInvalid, UnicodeDecodeError, ...
        problem = diagnose_files(files)
        if problem is not None:
            raise problem from e
        raise


@contextmanager
def _quiet_datasets():
    """`datasets`' JSON builder logs an ERROR line ("Failed to load JSON from file ... JSON parse error: ...")
    before it raises; the exception (kept as the DataError's cause) says the same, and the user's `error:` line
    must be ours, so its log is silenced while it loads."""
    import logging

    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def diagnose_files(files: Iterable[str | os.PathLike]) -> DataError | None:
    """``diagnose`` over ``files`` (a directory stands for the data files under it): the first broken file's
    DataError, else the first empty one's (one empty file among others may be harmless), else None."""
    paths = []
    for f in map(Path, files):
        paths += sorted(p for p in f.rglob("*") if p.suffix in BUILDERS and p.is_file()) if f.is_dir() else [f]
    problems = [p for p in map(diagnose, paths) if p is not None]
    problems.sort(key=lambda p: " is empty" in p.problem)
    return problems[0] if problems else None


def first_text(texts: Iterable) -> int | None:
    """Index of the first document with non-whitespace text (None values count as empty), or None if there is
    none. Stops at the first such document: cheap for any real corpus."""
    for i, text in enumerate(texts):
        if isinstance(text, str) and text.strip():
            return i
    return None


def row_location(files: list, index: int) -> str:
    """``path:line`` of row ``index`` (from 0, in file order) of one .jsonl file, else ``<files> row N``."""
    files = [Path(f) for f in files]
    if len(files) == 1 and files[0].suffix == ".jsonl":
        for i, (number, _) in enumerate(read_json_lines(files[0])):
            if i == index:
                return f"{files[0]}:{number}"
    where = ", ".join(str(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
    return f"{where} row {index + 1}"


__all__ = ["BUILDERS", "read_lines", "read_json_lines", "diagnose", "diagnose_files", "load_files", "first_text", "row_location",
           "empty_file_error", "NOT_UTF8_FIX", "NOT_JSON_FIX"]
