"""Pretraining data: nanochat parity of the packed batches, exact resume, rank striding, sources and their errors."""

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FIXTURES, shared_path

from modeling_nanochat.data import sources as pretrain_sources
from modeling_nanochat.data.loader import PretrainLoader, main, resolve_data
from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer

GOLDEN = FIXTURES / "nanochat_dataloader"
DOC_SIZES = [1, 3, 1, 6, 2, 14, 1, 4, 2, 9]  # paragraphs per doc, cycled: short docs and docs longer than a row
SHARD_SPLITS = [(0, 130), (130, 250), (250, None)]  # two train shards and the val shard
ROW_GROUP = 16
_META_FILE = GOLDEN / "meta.json"  # a missing fixture fails the parity test instead of breaking collection
META = json.loads(_META_FILE.read_text()) if _META_FILE.exists() else {"configs": {"missing": 0}}


def tiny_docs() -> list[str]:
    """text_sample.txt cut into documents of DOC_SIZES paragraphs, with a few edge cases planted."""
    paragraphs = [p for p in shared_path("text_sample.txt").read_text().split("\n\n") if p.strip()]
    docs, i, k = [], 0, 0
    while i < len(paragraphs):
        n = DOC_SIZES[k % len(DOC_SIZES)]
        docs.append("\n\n".join(paragraphs[i:i + n]))
        i, k = i + n, k + 1
    docs[0] = "<|bos|>" + docs[0] + "<|user_start|>"  # typed special tokens must stay ordinary text
    docs[2] = "café 日本語 🙂 " + docs[2]
    docs[7] = ""  # an empty document is a lone BOS
    return docs


def write_tiny_shards(folder: Path) -> list[Path]:
    """shard_00000/1 (train) and shard_00002 (val), row groups of 16 docs; the recipe of the golden fixture."""
    folder.mkdir(parents=True, exist_ok=True)
    docs, paths = tiny_docs(), []
    for i, (a, b) in enumerate(SHARD_SPLITS):
        path = folder / f"shard_{i:05d}.parquet"
        pq.write_table(pa.table({"text": docs[a:b]}), path, row_group_size=ROW_GROUP)
        paths.append(path)
    return paths


def docs_sha256(docs: list[str]) -> str:
    return hashlib.sha256("\x00".join(docs).encode()).hexdigest()


@pytest.fixture(scope="module")
def tok():
    return convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_tiny_shards(folder)
    return folder


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(tiny_docs())))
    return path


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for step, ((xi, yi), (wx, wy)) in enumerate(zip(got, want)):
        assert xi.dtype == yi.dtype == torch.long and xi.shape == wx.shape, step
        assert torch.equal(xi, wx) and torch.equal(yi, wy), f"batch {step} differs"


# ----------------------------------------------------------------------------------------------------------------
# 1. Golden parity with nanochat's own dataloader


def test_fixture_recipe_rebuilds_the_same_docs():
    assert docs_sha256(tiny_docs()) == META["docs_sha256"]
    assert [list(s) for s in SHARD_SPLITS] == META["shard_splits"] and META["row_group"] == ROW_GROUP


@pytest.mark.parametrize("name", META["configs"])
def test_batches_equal_nanochat(name, tok, shard_dir):
    cfg = META["configs"][name]
    golden = np.load(GOLDEN / "golden.npz")
    source = resolve_data(str(shard_dir))
    for rank in range(cfg["world_size"]):
        want = torch.from_numpy(golden[f"{name}_rank{rank}"].astype(np.int64))  # [steps, 2, B, T]
        loader = PretrainLoader(source, tok, batch_size=cfg["B"], seq_len=cfg["T"], split=cfg["split"], rank=rank,
                                world_size=cfg["world_size"], tokenizer_batch_size=cfg["tokenizer_batch_size"],
                                buffer_size=cfg["buffer_size"])
        assert_same_batches(take(loader, len(want)), [(w[0], w[1]) for w in want])


def test_rows_start_with_bos_and_targets_are_shifted_inputs(tok, shard_dir):
    loader = PretrainLoader(resolve_data(str(shard_dir)), tok, batch_size=3, seq_len=48, buffer_size=20)
    bos = tok.convert_tokens_to_ids("<|bos|>")
    for x, y in take(loader, 5):
        assert (x[:, 0] == bos).all() and torch.equal(x[:, 1:], y[:, :-1])


# ----------------------------------------------------------------------------------------------------------------
# 2. Exact resume


def _resume_matches(source, tok, world_size, k=4, n=5, **kw):
    for rank in range(world_size):
        make = lambda: PretrainLoader(source, tok, rank=rank, world_size=world_size, **kw)  # noqa: E731
        straight = make()
        want = take(straight, k + n)
        interrupted = make()
        take(interrupted, k)
        state = interrupted.state_dict()
        resumed = make()
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, n), want[k:])
        assert resumed.batches_yielded == k + n


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_parquet_is_step_exact(tok, shard_dir, tmp_path, world_size):
    # tokenizer batches of 7 docs in row groups of 16: the cursor sits mid row group; 12 batches of 2x64 cross
    # epochs of rank 1's share, and the state goes through torch.save as the training checkpoint stores it
    source = resolve_data(str(shard_dir))
    kw = dict(batch_size=2, seq_len=64, tokenizer_batch_size=7, buffer_size=10)
    _resume_matches(source, tok, world_size, k=12, n=6, **kw)
    loader = PretrainLoader(source, tok, **kw)
    take(loader, 3)
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    again = PretrainLoader(source, tok, **kw)
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert_same_batches(take(again, 3), take(loader, 3))


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_jsonl_is_step_exact(tok, jsonl_file, tmp_path, world_size):
    source = resolve_data(str(jsonl_file), cache_dir=str(tmp_path / "hf"), row_group_size=ROW_GROUP)
    _resume_matches(source, tok, world_size, batch_size=2, seq_len=64, tokenizer_batch_size=5, buffer_size=8)


def test_resume_with_the_default_buffer_of_many_epochs(tok, shard_dir):
    # 1000 buffered docs > the 250 train docs: the buffer spans epochs; its tokens must all come back
    _resume_matches(resolve_data(str(shard_dir)), tok, 1, k=3, n=3, batch_size=2, seq_len=64)


def test_state_of_another_rank_is_refused(tok, shard_dir):
    source = resolve_data(str(shard_dir))
    a = PretrainLoader(source, tok, batch_size=1, seq_len=32, rank=0, world_size=2, buffer_size=4)
    b = PretrainLoader(source, tok, batch_size=1, seq_len=32, rank=1, world_size=2, buffer_size=4)
    next(a)
    with pytest.raises(ValueError, match="rank 0 vs 1"):
        b.load_state_dict(a.state_dict())


# ----------------------------------------------------------------------------------------------------------------
# 3. Rank striding and the val split


def _row_groups_read(source, tok, split, rank, world_size, count):
    """The first ``count`` (shard, row group) reads of a loader, recorded by wrapping its shards' readers."""
    seen = []
    for shard in source.shards(split):
        def reader(shard=shard, inner=type(shard).reader):
            read = inner(shard)
            return lambda g: seen.append((shard.name, g)) or read(g)
        shard.reader = reader
    loader = PretrainLoader(source, tok, batch_size=2, seq_len=64, split=split, rank=rank, world_size=world_size,
                            tokenizer_batch_size=64, buffer_size=4)
    while len(seen) < count:
        next(loader)
    return seen[:count]


def test_ranks_read_disjoint_strided_row_groups(tok, shard_dir):
    groups = {p.name: pq.ParquetFile(p).num_row_groups for p in sorted(shard_dir.glob("*.parquet"))[:-1]}
    assert all(n > 2 for n in groups.values())
    epochs = []
    for rank in range(2):
        mine = [(name, g) for name, n in groups.items() for g in range(rank, n, 2)]  # rank, rank+W, ... per file
        seen = _row_groups_read(resolve_data(str(shard_dir)), tok, "train", rank, 2, 2 * len(mine))
        assert seen == mine + mine  # in order, and the next epoch starts over
        epochs.append(set(mine))
    assert not epochs[0] & epochs[1]
    assert epochs[0] | epochs[1] == {(name, g) for name, n in groups.items() for g in range(n)}


def test_val_split_is_the_last_shard_only(tok, shard_dir):
    source = resolve_data(str(shard_dir))
    assert [s.name for s in source.val] == ["shard_00002.parquet"]
    assert [s.name for s in source.train] == ["shard_00000.parquet", "shard_00001.parquet"]
    n_val = pq.ParquetFile(shard_dir / "shard_00002.parquet").num_row_groups
    for rank in range(2):
        seen = _row_groups_read(resolve_data(str(shard_dir)), tok, "val", rank, 2, 4)
        assert seen == ([("shard_00002.parquet", g) for g in range(rank, n_val, 2)] * 4)[:4]  # epochs cycle on it
    train = _row_groups_read(resolve_data(str(shard_dir)), tok, "train", 0, 1, 30)
    assert {n for n, _ in train} == {"shard_00000.parquet", "shard_00001.parquet"}


def test_jsonl_holds_out_a_deterministic_tail(jsonl_file, tmp_path):
    source = resolve_data(str(jsonl_file), cache_dir=str(tmp_path / "hf"), row_group_size=ROW_GROUP)
    docs = tiny_docs()
    n_val = max(1, int(len(docs) * pretrain_sources.VAL_FRACTION))
    val = [t for g in range(len(source.val[0].row_group_rows)) for t in source.val[0].reader()(g)]
    train = [t for g in range(len(source.train[0].row_group_rows)) for t in source.train[0].reader()(g)]
    assert val == docs[-n_val:] and train == docs[:-n_val]
    n_train = len(docs) - n_val  # small splits are cut into up to MIN_ROW_GROUPS virtual row groups
    assert source.train[0].row_group_rows[0] == min(ROW_GROUP, -(-n_train // pretrain_sources.MIN_ROW_GROUPS))


def test_a_small_validation_tail_reaches_every_rank(jsonl_file, tok, tmp_path):
    source = resolve_data(str(jsonl_file), cache_dir=str(tmp_path / "hf"))
    for rank in range(3):  # the tail is 3 documents: one virtual row group each
        x, _ = next(PretrainLoader(source, tok, batch_size=1, seq_len=32, split="val", rank=rank, world_size=3))
        assert x.shape == (1, 32)


def test_txt_file_is_one_document_per_paragraph(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc\nline two\n\nsecond doc\n\nthird\n")
    source = resolve_data(str(path), cache_dir=str(tmp_path / "hf"))
    texts = [t for shard in (source.train[0], source.val[0])
             for g in range(len(shard.row_group_rows)) for t in shard.reader()(g)]
    assert [t.strip() for t in texts] == ["first doc\nline two", "second doc", "third"]


# ----------------------------------------------------------------------------------------------------------------
# 4. Clear errors


def test_empty_directory(tmp_path):
    with pytest.raises(ValueError, match="(?s)holds no data.*data.loader --data climbmix"):
        resolve_data(str(tmp_path))


def test_parquet_without_text_column_names_the_column(tmp_path):
    for i in range(2):
        pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / f"shard_{i:05d}.parquet")
    with pytest.raises(ValueError, match=r"(?s)no 'text' column \(columns: \['content'\]\).*text_column"):
        resolve_data(str(tmp_path))
    assert len(resolve_data(str(tmp_path), text_column="content").train) == 1


def test_jsonl_without_text_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "x"}\n{"body": "y"}\n')
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: \['body'\]\)"):
        resolve_data(str(path), cache_dir=str(tmp_path / "hf"))


def test_a_single_shard_is_not_enough(tmp_path):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "only.parquet")
    with pytest.raises(ValueError, match="at least two.*last is validation"):
        resolve_data(str(tmp_path))


def test_offline_without_data_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE=1.*--data DIR"):
        resolve_data("climbmix", cache_dir=str(tmp_path), num_shards=2)
    with pytest.raises(FileNotFoundError, match="no climbmix shards.*data.loader --data climbmix -n"):
        resolve_data(None, cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 5  # not huggingface_hub's ~23 s of retries


def test_no_network_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(pretrain_sources, "HUB_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="cannot reach the Hugging Face Hub.*--data DIR"):
        resolve_data("fineweb-edu", cache_dir=str(tmp_path), num_shards=1)
    assert time.perf_counter() - t0 < 5
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_download_retries_and_writes_nanochat_layout(shard_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls, src = [], sorted(shard_dir.glob("*.parquet"))[0].read_bytes()

    def fake_download(repo_id, filename, *, repo_type, local_dir, endpoint):
        calls.append((repo_id, filename, repo_type))
        if len(calls) == 1:
            raise OSError("connection reset")  # a transient failure: retried after a (patched) backoff
        (Path(local_dir) / filename).write_bytes(src)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda *a, **k: None)
    monkeypatch.setattr(pretrain_sources.time, "sleep", lambda s: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    main(["--data", "fineweb-edu", "-n", "2", "--cache-dir", str(tmp_path), "-w", "1"])
    assert sorted(f for _, f, _ in calls) == ["shard_00000.parquet", "shard_00000.parquet", "shard_00001.parquet",
                                              "shard_01822.parquet"]
    assert {(r, t) for r, _, t in calls} == {("karpathy/fineweb-edu-100b-shuffle", "dataset")}
    assert "val=['shard_01822.parquet']" in capsys.readouterr().out
    calls.clear()
    resolve_data("fineweb-edu", cache_dir=str(tmp_path), num_shards=2)
    assert not calls  # present shards are not fetched again


def test_hub_id_without_network_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(pretrain_sources, "HUB_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="cannot reach the Hugging Face Hub for dataset someone/corpus"):
        resolve_data("someone/corpus:en", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 5


def test_preset_uses_local_shards_without_network(shard_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for i, src in zip([0, 1, 6542], sorted(shard_dir.glob("*.parquet"))):
        (tmp_path / f"shard_{i:05d}.parquet").write_bytes(src.read_bytes())
    source = resolve_data("climbmix", cache_dir=str(tmp_path))  # every local train shard, val pinned to 06542
    assert [s.name for s in source.train] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [s.name for s in source.val] == ["shard_06542.parquet"]
    assert [s.name for s in resolve_data(None, cache_dir=str(tmp_path), num_shards=1).train] == ["shard_00000.parquet"]
    with pytest.raises(FileNotFoundError, match="missing.*shard_00002.parquet.*download=False"):
        resolve_data("climbmix", cache_dir=str(tmp_path), num_shards=3, download=False)


def test_unknown_sources(tmp_path):
    with pytest.raises(ValueError, match="neither a preset.*Hub dataset id"):
        resolve_data("no-such-thing")
    with pytest.raises(FileNotFoundError, match="matches no files"):
        resolve_data(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match="unknown file type '.csv'"):
        resolve_data(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="num_shards only applies"):
        resolve_data(str(tmp_path), num_shards=3)


def test_a_rank_without_documents(tok, tmp_path):
    for i in range(2):
        pq.write_table(pa.table({"text": ["one doc"]}), tmp_path / f"s{i}.parquet")  # one row group per shard
    with pytest.raises(ValueError, match="(?s)rank 1 of 2 gets no train documents.*fewer processes"):
        PretrainLoader(resolve_data(str(tmp_path)), tok, batch_size=1, seq_len=8, rank=1, world_size=2)


def test_cli_help_and_offline_download(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "validation shard" in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="error: 3 file.*missing.*HF_HUB_OFFLINE"):
        main(["--data", "climbmix", "-n", "2", "--cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--data", "climbmix"])  # -n is required for a preset
    assert "needs -n" in capsys.readouterr().err
