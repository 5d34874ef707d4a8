"""Atomic writes: a reader (or a crash) never sees a half-written file or directory under its final name.

Everything this package saves goes through here: checkpoints and converted models (`atomic_dir`), single files such
as metrics, reports and result JSON (`atomic_write`, `atomic_copy`). Temp names start with `.tmp-` beside the
target, so a crash leaves only `.tmp-*` entries, which `remove_stale_temp_dirs` clears when a run starts or resumes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

TMP_PREFIX = ".tmp-"


class OutputExistsError(ValueError):
    """The output directory holds something and overwriting it was not asked for."""


class atomic_dir:
    """Build into a sibling temp dir; on success swap it into place (the old dir is removed only afterwards), so a
    crash never leaves a half-written directory under the final name. The check for an existing non-empty target
    happens at construction, before any work."""

    def __init__(self, out_dir, overwrite: bool = False, *, prefix: str | None = None):
        self.out_dir = os.path.abspath(out_dir)
        self.prefix = prefix or TMP_PREFIX + os.path.basename(self.out_dir) + "-"
        if os.path.exists(self.out_dir) and os.listdir(self.out_dir) and not overwrite:
            raise OutputExistsError(f"{self.out_dir} exists and is not empty; choose another --output-dir or pass "
                                    "--overwrite (the old contents are replaced only after the new ones are complete)")

    def __enter__(self) -> str:
        parent = os.path.dirname(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=self.prefix, dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        replace_dir(self.tmp, self.out_dir)
        return False


def replace_dir(src: str, dst: str) -> None:
    """Move the complete directory `src` to `dst`, replacing what is there; the old one is deleted only after."""
    old = None
    if os.path.exists(dst):
        old = dst + ".old-" + os.path.basename(src)
        os.rename(dst, old)
    os.rename(src, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _temp_beside(path: str, suffix: str = "") -> str:
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + "-", suffix=suffix, dir=folder)
    os.close(fd)
    return tmp


def atomic_write(path, data: str | bytes) -> None:
    """Write a whole file (text or bytes) under a temp name and rename it into place."""
    tmp = _temp_beside(str(path))
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path, payload, indent: int | None = 2) -> None:
    atomic_write(path, json.dumps(payload, indent=indent) + ("\n" if indent else ""))


def atomic_copy(src, dst) -> None:
    """Copy a file so that `dst` is either the old file or the complete new one."""
    tmp = _temp_beside(str(dst))
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temp_dirs(output_dir) -> list[str]:
    """Delete what a crash left half-written in `output_dir` (temp files and dirs of the writers above: a
    checkpoint of a large model is gigabytes). Call it on the main process before a run starts or resumes, when no
    other writer can be busy there. Returns what was removed."""
    removed = []
    for path in sorted(glob.glob(os.path.join(str(output_dir), TMP_PREFIX + "*"))):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        removed.append(path)
    return removed
