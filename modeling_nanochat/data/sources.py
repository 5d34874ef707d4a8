"""Where pretraining text comes from: ``resolve_data(--data)`` -> a ``DataSource`` of train and val shards.

A shard is anything split into *row groups* of documents that can be read one at a time (``read(i)`` -> texts):

* **Parquet shards** (nanochat's layout, §5.1): ``None``/``"climbmix"`` = ``karpathy/climbmix-400b-shuffle``
  (``shard_00000 … shard_06542``, val = ``shard_06542``), ``"fineweb-edu"`` = ``karpathy/fineweb-edu-100b-shuffle``
  (nanochat's dataset before 2026-03-04, ``shard_00000 … shard_01822``, val pinned to its last shard
  ``shard_01822``), or a local directory of ``*.parquet`` files (sorted by name, the **last file is validation**,
  as nanochat's ``list_parquet_files``). The presets live in nanochat's own folders
  (``$NANOCHAT_BASE_DIR`` or ``~/.cache/nanochat``, then ``base_data_climbmix`` / ``base_data``), so shards a
  nanochat install already downloaded are reused (a legacy nanochat ``base_data`` folder without
  ``shard_01822``: pass the folder itself as ``--data DIR`` for nanochat's last-local-file rule). With
  ``num_shards=N`` the train shards are exactly ``0..N-1`` (missing ones downloaded); without it, every train
  shard present locally (nanochat's rule).
* **Anything else `datasets` reads** — a ``.jsonl``/``.json``/``.txt``/``.parquet`` file, a glob of them, a directory
  of jsonl/json/txt files, or a Hub dataset id ``owner/name`` or ``owner/name:config`` — is loaded (not streamed:
  the Arrow cache gives random access, hence rank striding and an exact resume; a Hub dataset is therefore
  downloaded whole, so give corpora of hundreds of GB as parquet shards) and cut into virtual row groups of
  ``row_group_size`` (1024, like nanochat's shards) consecutive rows. Validation is the dataset's ``validation``
  split when it has one, else a deterministic held-out tail: the last 1% of rows (at least one). A ``.txt`` file
  is read with one document per paragraph (blank-line separated); use jsonl for explicit documents.

Downloads go through ``huggingface_hub.hf_hub_download`` (5 attempts with 2, 4, 8, 16 s backoff, a tqdm bar over
shards). Before any download one request checks that the Hub answers, so an offline machine fails at once with
an error that says how to get data (``HF_HUB_OFFLINE=1`` is honoured without a request) instead of sitting in
``huggingface_hub``'s ~23 s of retries.
"""

from __future__ import annotations

import glob as globlib
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from modeling_nanochat.data.files import first_text, load_files
from modeling_nanochat.tokenizer.tokenizer import _BUILDERS  # file suffix -> `datasets` builder, shared with the tokenizer corpus reader
from modeling_nanochat.utils.errors import DataError

ROW_GROUP_SIZE = 1024  # docs per virtual row group for `datasets` sources (nanochat's shards use 1024)
MIN_ROW_GROUPS = 64  # smaller splits get smaller virtual row groups, so up to 64 ranks each get some documents
VAL_FRACTION = 0.01  # held-out tail when a `datasets` source has no validation split
DOWNLOAD_ATTEMPTS = 5
HUB_ENDPOINT: str | None = None  # None = huggingface_hub's default (HF_ENDPOINT); tests point it at a dead port

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")


@dataclass(frozen=True)
class Preset:
    repo_id: str
    last_shard: int  # the validation shard
    subdir: str  # nanochat's folder name under its base dir

    def shard_name(self, index: int) -> str:
        return f"shard_{index:05d}.parquet"


PRESETS = {
    "climbmix": Preset("karpathy/climbmix-400b-shuffle", 6542, "base_data_climbmix"),
    "fineweb-edu": Preset("karpathy/fineweb-edu-100b-shuffle", 1822, "base_data"),
}
DEFAULT_PRESET = "climbmix"


# ----------------------------------------------------------------------------------------------------------------
# Shards


@dataclass
class ParquetShard:
    """One parquet file, read a row group at a time (only the text column)."""

    path: str
    text_column: str
    row_group_rows: list[int]  # documents per row group, from the footer (no data read)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def reader(self):
        pf = pq.ParquetFile(self.path)
        return lambda i: pf.read_row_group(i, columns=[self.text_column]).column(0).drop_null().to_pylist()

    @classmethod
    def open(cls, path: str, text_column: str) -> ParquetShard:
        try:
            meta = pq.read_metadata(path)
        except Exception as e:  # pyarrow raises ArrowInvalid & co. for a truncated or foreign file
            raise DataError(f"{path} is not a readable parquet file ({e})",
                            "delete it and download (or write) it again") from e
        columns = meta.schema.to_arrow_schema().names
        if text_column not in columns:
            raise DataError(f"{path} has no {text_column!r} column (columns: {columns}). Pretraining reads the "
                            "documents from one string column",
                            f"rename yours to {text_column!r} (or pass text_column=<name> to resolve_data)")
        return cls(path, text_column, [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])


@dataclass
class ArrowShard:
    """A `datasets.Dataset` cut into row groups of ``row_group_size`` consecutive rows."""

    dataset: object  # datasets.Dataset with only the text column
    row_group_size: int
    name: str

    @property
    def row_group_rows(self) -> list[int]:
        n, g = len(self.dataset), self.row_group_size
        return [min(g, n - s) for s in range(0, n, g)]

    def reader(self):
        col = self.dataset.column_names[0]
        g = self.row_group_size
        return lambda i: [t for t in self.dataset[i * g:(i + 1) * g][col] if t is not None]


@dataclass
class DataSource:
    """Train and val shards of one corpus. ``shards(split)`` is what `PretrainLoader` iterates."""

    name: str
    train: list = field(repr=False)
    val: list = field(repr=False)
    text_column: str = "text"

    def shards(self, split: str) -> list:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def __repr__(self) -> str:
        return (f"DataSource({self.name!r}, train={len(self.train)} shard(s) "
                f"{sum(sum(s.row_group_rows) for s in self.train):,} docs, val={[s.name for s in self.val]})")


# ----------------------------------------------------------------------------------------------------------------
# Resolving --data


def resolve_data(data: str | None, *, cache_dir: str | None = None, num_shards: int | None = None,
                 download: bool = True, text_column: str = "text", row_group_size: int = ROW_GROUP_SIZE) -> DataSource:
    """Turn ``--data`` into a `DataSource` (see the module docstring for the accepted forms and the val split).

    ``cache_dir``: the shard folder of a preset (default nanochat's) or the `datasets` cache of other sources.
    ``num_shards``: presets only, train shards ``0..N-1`` (+ the val shard), downloaded if missing and allowed.
    """
    name = DEFAULT_PRESET if data is None else str(data)
    if name in PRESETS:
        return _preset_source(name, cache_dir, num_shards, download, text_column)
    if num_shards is not None:
        raise ValueError(f"num_shards only applies to the presets {sorted(PRESETS)}, not to --data {name!r}")
    path = Path(name).expanduser()
    if path.is_dir():
        parquets = sorted(p for p in path.iterdir() if p.suffix == ".parquet" and p.is_file())
        if parquets:
            return _shard_dir_source(path, parquets, text_column)
        files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS and p.is_file())
        if not files:
            raise DataError(f"{path} holds no data: expected *.parquet shards (the last one is validation) or "
                            ".jsonl/.json/.txt files", "download shards with `python -m "
                            "modeling_nanochat.data.loader --data climbmix -n 8` or point --data at a folder "
                            "that has them")
        return _files_source(name, files, cache_dir, text_column, row_group_size)
    if path.is_file():
        if path.suffix not in _BUILDERS:
            raise DataError(f"{path}: unknown file type {path.suffix!r}",
                            f"pretraining reads {sorted(_BUILDERS)} files: convert it to one of them")
        return _files_source(name, [path], cache_dir, text_column, row_group_size)
    if globlib.has_magic(name):
        files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(name), recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"--data {name!r} matches no files")
        return _files_source(name, files, cache_dir, text_column, row_group_size)
    if _HUB_ID.match(name) and not name.startswith((".", "~", "/")) and Path(name).suffix not in _BUILDERS:
        return _hub_source(name, cache_dir, text_column, row_group_size)
    raise ValueError(f"--data {name!r} is neither a preset ({', '.join(PRESETS)}), an existing directory/file, a glob, "
                     "nor a Hub dataset id (owner/name or owner/name:config)")


def default_cache_dir(preset: str) -> str:
    """nanochat's folder for a preset: $NANOCHAT_BASE_DIR (or ~/.cache/nanochat) / base_data_climbmix | base_data."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    return os.path.join(base, PRESETS[preset].subdir)


def _preset_source(name, cache_dir, num_shards, download, text_column) -> DataSource:
    preset = PRESETS[name]
    folder = cache_dir or default_cache_dir(name)
    val_name = preset.shard_name(preset.last_shard)
    if num_shards is not None:
        if not 1 <= num_shards <= preset.last_shard:
            raise ValueError(f"num_shards must be in 1..{preset.last_shard} for {name}, got {num_shards}")
        train = [preset.shard_name(i) for i in range(num_shards)]
    else:
        present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        train = [f for f in present if f.endswith(".parquet") and f != val_name]
        if not train:
            raise FileNotFoundError(
                f"no {name} shards in {folder}. Download some first: `python -m modeling_nanochat.data.loader "
                f"--data {name} -n 8 --cache-dir {folder}` (nanochat's speedrun uses ~170 shards for d24), pass "
                f"num_shards, or point --data at a local folder of parquet shards")
    wanted = train + [val_name]
    missing = [f for f in wanted if not os.path.exists(os.path.join(folder, f))]
    if missing:
        if not download:
            raise FileNotFoundError(f"{len(missing)} {name} shard(s) missing in {folder} (e.g. {missing[0]}) and "
                                    "download=False")
        download_files(preset.repo_id, missing, folder)
    paths = [os.path.join(folder, f) for f in wanted]
    shards = [ParquetShard.open(p, text_column) for p in paths]
    return DataSource(f"{name} ({folder})", shards[:-1], shards[-1:], text_column)


def _shard_dir_source(folder: Path, parquets: list[Path], text_column: str) -> DataSource:
    if len(parquets) < 2:
        raise ValueError(f"{folder} has a single parquet file but shards need at least two: all but the last are "
                         f"train, the last is validation (nanochat's rule). Add a shard, or pass the file itself "
                         f"({parquets[0]}) to hold out a tail of it instead")
    shards = [ParquetShard.open(str(p), text_column) for p in parquets]
    _require_text_in_shards(str(folder), shards[:-1], text_column)
    return DataSource(str(folder), shards[:-1], shards[-1:], text_column)


def _files_source(name, files, cache_dir, text_column, row_group_size) -> DataSource:
    builders = {_BUILDERS.get(f.suffix) for f in files}
    if None in builders:
        raise ValueError(f"{name}: expected .parquet, .jsonl/.json or .txt files, found {[f.name for f in files][:5]}")
    if len(builders) > 1:
        raise ValueError(f"{name} mixes file types {sorted(builders)}; point --data at one kind")
    builder = builders.pop()
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    # a file `datasets` cannot read (not UTF-8, a line that is not JSON, empty) -> DataError naming file and line
    ds = load_files(builder, files, cache_dir=cache_dir, **kwargs)
    return _split_dataset(name, ds, None, text_column, row_group_size)


def _hub_source(name, cache_dir, text_column, row_group_size) -> DataSource:
    from datasets import load_dataset

    repo_id, _, config = name.partition(":")
    if not _offline():
        _check_hub(lambda: _hub_api().dataset_info(repo_id, timeout=10), f"dataset {repo_id}")
    try:
        dsd = load_dataset(repo_id, config or None, cache_dir=cache_dir)
    except ConnectionError as e:
        raise ConnectionError(f"{repo_id} is not in the local `datasets` cache and the Hub is offline ({e}). "
                              "Run once with network access, or pass --data DIR of parquet shards") from e
    if "train" not in dsd:
        raise ValueError(f"{name} has no 'train' split (splits: {list(dsd)})")
    return _split_dataset(name, dsd["train"], dsd.get("validation"), text_column, row_group_size)


def _split_dataset(name, train, val, text_column, row_group_size) -> DataSource:
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
    if text_column not in train.column_names:
        raise DataError(f"{name} has no {text_column!r} column (columns: {train.column_names})",
                        f"name the documents' field {text_column!r}, or pass text_column=<the column with the "
                        "documents>")
    train = train.select_columns([text_column])
    if not any(first_text(batch[text_column]) is not None for batch in train.iter(batch_size=1024)):
        raise _no_text(name, len(train))
    how = "validation split"
    if val is None:  # deterministic held-out tail
        n = len(train)
        if n < 2:
            raise DataError(f"{name} has {n} document(s): need at least 2 (train + held-out validation)",
                            "give a corpus with more documents (a .txt file has one per blank-line separated "
                            "paragraph, a .jsonl file one per line)")
        n_val = max(1, int(n * VAL_FRACTION))
        train, val = train.select(range(n - n_val)), train.select(range(n - n_val, n))
        how = f"last {n_val} rows"
    else:
        val = val.select_columns([text_column])
    # These row groups are virtual, so a small split is cut into up to MIN_ROW_GROUPS smaller groups: otherwise a
    # few-thousand-row validation tail is one group and every rank but the first would get no validation data.
    def size(ds):
        return max(1, min(row_group_size, -(-len(ds) // MIN_ROW_GROUPS)))
    return DataSource(f"{name} (val: {how})", [ArrowShard(train, size(train), f"{name}:train")],
                      [ArrowShard(val, size(val), f"{name}:val")], text_column)


def _no_text(name: str, documents: int) -> DataError:
    return DataError(f"{name}: the corpus is empty: none of its {documents:,} document(s) has any text (all are empty "
                     "or only whitespace), so there is nothing to pretrain on",
                     "point --data at a corpus with text: a .txt file (one document per paragraph), a .jsonl file "
                     "with a \"text\" field per line, or parquet shards with a 'text' column")


def _require_text_in_shards(name: str, shards: list, text_column: str) -> None:
    """DataError unless some document of ``shards`` has text; reads row groups until the first one that does (for
    real data: one row group of the first shard)."""
    documents = 0
    for shard in shards:
        read = shard.reader()
        for group, rows in enumerate(shard.row_group_rows):
            if rows and first_text(read(group)) is not None:
                return
            documents += rows
    raise _no_text(name, documents)


# ----------------------------------------------------------------------------------------------------------------
# Downloading


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=HUB_ENDPOINT)


def _check_hub(request, what: str) -> None:
    """One request without retries: a machine without network fails here in milliseconds."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        request()
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{what} does not exist on the Hub (or needs a token: `hf auth login`)") from e
    except HfHubHTTPError:
        raise
    except Exception as e:  # connection refused, DNS failure, timeout: the transport's own exception types
        raise ConnectionError(f"cannot reach the Hugging Face Hub for {what} ({type(e).__name__}: {e}). Connect to "
                              "the network, or pass --data DIR with parquet shards (or a jsonl/txt file)") from e


def download_files(repo_id: str, filenames: list[str], folder: str, workers: int = 4) -> list[str]:
    """Download dataset files into ``folder`` (skipping present ones) in parallel; returns their paths."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from tqdm.auto import tqdm

    paths = [os.path.join(folder, f) for f in filenames]
    todo = [f for f, p in zip(filenames, paths) if not os.path.exists(p)]
    if not todo:
        return paths
    if _offline():
        raise ConnectionError(f"{len(todo)} file(s) of {repo_id} are missing in {folder} (e.g. {todo[0]}) and "
                              "HF_HUB_OFFLINE=1. Download them on a connected machine with `python -m "
                              "modeling_nanochat.data.loader --data ... -n N` and copy the folder, or pass "
                              "--data DIR")
    url = hf_hub_url(repo_id, todo[0], repo_type="dataset", endpoint=HUB_ENDPOINT)
    _check_hub(lambda: get_hf_file_metadata(url, timeout=10, retry_on_errors=False), f"{repo_id}/{todo[0]}")
    os.makedirs(folder, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(todo), unit="shard", desc=f"downloading {repo_id}") as bar:
        futures = {pool.submit(_download_one, repo_id, f, folder): f for f in todo}
        for fut in as_completed(futures):
            fut.result()
            bar.update(1)
    return paths


def _download_one(repo_id: str, filename: str, folder: str) -> None:
    from huggingface_hub import hf_hub_download

    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:  # hf_hub_download writes to a temporary file and renames it: no half-written shard is ever visible
            hf_hub_download(repo_id, filename, repo_type="dataset", local_dir=folder, endpoint=HUB_ENDPOINT)
            return
        except Exception as e:
            if attempt == DOWNLOAD_ATTEMPTS:
                raise RuntimeError(f"downloading {repo_id}/{filename} failed {attempt} times: {e}") from e
            time.sleep(2**attempt)  # nanochat's backoff


def download_preset(name: str, num_shards: int, cache_dir: str | None = None, workers: int = 4) -> str:
    """nanochat's ``python -m nanochat.dataset -n N``: train shards 0..N-1 (all when N = -1) plus the val shard."""
    preset = PRESETS[name]
    n = preset.last_shard if num_shards == -1 else min(num_shards, preset.last_shard)
    if n < 1:
        raise ValueError(f"-n must be >= 1 (or -1 for all {preset.last_shard} train shards), got {num_shards}")
    folder = cache_dir or default_cache_dir(name)
    names = [preset.shard_name(i) for i in [*range(n), preset.last_shard]]
    download_files(preset.repo_id, names, folder, workers)
    return folder
