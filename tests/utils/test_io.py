"""Atomic writes (modeling_nanochat/utils/io.py): a crash leaves nothing under the final name, and what it leaves
(`.tmp-*`) is cleared when a run starts or resumes."""

import os

import pytest

from modeling_nanochat.pretrain.trainer import RunError, prepare_output_dir
from modeling_nanochat.utils.io import (OutputExistsError, atomic_copy, atomic_dir, atomic_write, atomic_write_json,
                                        remove_stale_temp_dirs)


def test_atomic_dir_swaps_in_only_a_complete_directory(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        assert not out.exists()  # nothing under the final name until the end
        open(os.path.join(tmp, "a.txt"), "w").write("new")
    assert (out / "a.txt").read_text() == "new"
    with pytest.raises(OutputExistsError, match="--overwrite"):
        atomic_dir(out)  # refused before any work
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            open(os.path.join(tmp, "a.txt"), "w").write("half")
            raise RuntimeError("crash while writing")
    assert (out / "a.txt").read_text() == "new"  # the old one is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # and the temp dir is gone


def test_atomic_file_writes(tmp_path):
    path = tmp_path / "sub" / "result.json"
    atomic_write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    atomic_write(path, b"bytes")
    assert path.read_bytes() == b"bytes"
    atomic_copy(path, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == b"bytes"
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".tmp-")]


def test_a_crashed_runs_leftovers_are_removed_at_start_and_resume(tmp_path):
    run = tmp_path / "run"
    (run / ".tmp-checkpoint-200" / "training_state").mkdir(parents=True)  # a checkpoint half written at a crash
    (run / ".tmp-metrics.jsonl-abc").write_text("partial")
    (run / "checkpoint-100").mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(RunError, match="checkpoint-100 hold no"):  # a checkpoint without state: never overwritten
        prepare_output_dir(str(run), resume=True, overwrite=False, is_main=True)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-100", "metrics.jsonl"]  # leftovers gone first
    (run / "checkpoint-100").rmdir()
    assert prepare_output_dir(str(run), resume=True, overwrite=False, is_main=True) is None  # nothing to lose
    (run / ".tmp-final-x").write_text("partial")
    assert prepare_output_dir(str(run), resume=True, overwrite=False, is_main=False) is None
    assert (run / ".tmp-final-x").exists()  # only the main process deletes
    assert remove_stale_temp_dirs(run) == [str(run / ".tmp-final-x")]
