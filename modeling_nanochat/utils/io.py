"""Atomic writes: a reader (or a crash) never sees a half-written file or directory under its final name.

Everything this package saves goes through here: checkpoints and converted models (`atomic_dir`), single files such
as metrics, reports and result JSON (`atomic_write`, `atomic_copy`). Temp names start with `.tmp-` beside the
target, so a crash leaves only `.tmp-*` entries, which `remove_stale_temp_dirs` clears when a run starts or resumes.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile

try:
    import resource  # POSIX only
except ImportError:  # pragma: no cover - Windows
    resource = None

from modeling_nanochat.utils.errors import NanochatError

TMP_PREFIX = ".tmp-"
# Errors of the file system that are the machine's state, not a bug: no permission, a read-only or full disk, a
# file-size limit. They become an OutputError naming the path; the temp is removed and what was there stays.
_WRITE_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
                 errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large (a file-size limit)"}


class OutputExistsError(NanochatError):
    """The output directory holds something and overwriting it was not asked for."""


class OutputError(NanochatError):
    """Writing an output failed for a reason of the machine (permissions, a full disk); nothing old was touched."""


def _write_errno(e: BaseException, path) -> int | None:
    """The errno of a failed write: an OSError's own; the one in the text of safetensors' SafetensorError ("File too
    large (os error 27)"); for torch.save, whose writer reports only "unexpected pos N vs M", the machine's state
    (a file-size limit is set, or the disk is nearly full)."""
    if isinstance(e, OSError):
        return e.errno
    text = str(e)
    for code in _WRITE_ERRNOS:
        if f"os error {code})" in text or os.strerror(code) in text:
            return code
    if "inline_container" in text or "PytorchStreamWriter" in text:
        if resource is not None and resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            return errno.EFBIG
        folder = os.path.dirname(os.path.abspath(str(path)))
        while folder and not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        if shutil.disk_usage(folder or ".").free < 64 * 2**20:
            return errno.ENOSPC
    return None


def output_error(e: BaseException, path) -> OutputError | None:
    """The OutputError for a write that failed for one of `_WRITE_ERRNOS` under `path`, else None (a bug)."""
    code = _write_errno(e, path)
    if code not in _WRITE_ERRNOS:
        return None
    fix = "free some space (or raise the limit) and run again" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) \
        else "choose a writable output directory"
    where = getattr(e, "filename", None) or path
    return OutputError(f"cannot write {path}: {_WRITE_ERRNOS[code]} ({where}); what was there before is unchanged",
                       fix)


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
        try:
            os.makedirs(parent, exist_ok=True)
            self.tmp = tempfile.mkdtemp(prefix=self.prefix, dir=parent)
        except OSError as e:
            raise (output_error(e, self.out_dir) or e) from e
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if (err := output_error(exc, self.out_dir)) is not None:
                raise err from exc
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
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + "-", suffix=suffix, dir=folder)
    except OSError as e:
        raise (output_error(e, path) or e) from e
    os.close(fd)
    return tmp


def atomic_write(path, data: str | bytes) -> None:
    """Write a whole file (text or bytes) under a temp name and rename it into place."""
    tmp = _temp_beside(str(path))
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if (err := output_error(e, path)) is not None:
            raise err from e
        raise


def atomic_write_json(path, payload, indent: int | None = 2) -> None:
    atomic_write(path, json.dumps(payload, indent=indent) + ("\n" if indent else ""))


def atomic_copy(src, dst) -> None:
    """Copy a file so that `dst` is either the old file or the complete new one."""
    tmp = _temp_beside(str(dst))
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if (err := output_error(e, dst)) is not None:
            raise err from e
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
