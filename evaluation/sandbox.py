"""Run model-written Python (HumanEval) in a locked-down subprocess.

Like nanochat's execution.py: a fresh interpreter per program, 5 s and 256 MB by default, stdin closed, a scrubbed
environment, a temporary work directory deleted afterwards, and success = exit status 0. Unlike it, the limits are
enforced by the kernel where the kernel allows it, with a Python audit hook (which cannot be removed) behind them:

| threat                          | kernel (when available)                                 | Python audit hook       |
|---------------------------------|---------------------------------------------------------|-------------------------|
| writes/deletes outside work dir | Landlock (Linux >= 5.13), also for child processes      | open/os.* path checks   |
| network                         | new network namespace (no interfaces up); Landlock >= 4 | sockets refused         |
|                                 | also refuses TCP bind/connect                           |                         |
| fork bombs, subprocesses        | RLIMIT_NPROC (not enforced for root); process group     | fork/exec/spawn/Popen   |
|                                 | killed at the end                                       | refused                 |
| signals to other processes      | Landlock >= 6 scopes signals to the sandbox             | os.kill/killpg refused  |
| infinite loops                  | wall-clock timeout (SIGKILL), RLIMIT_CPU                |                         |
| memory bombs                    | RLIMIT_AS / RLIMIT_DATA                                 |                         |
| huge outputs / files            | RLIMIT_FSIZE (stdout/stderr go to files)                |                         |

``capabilities()`` reports which kernel layers work on this machine (probed once); the rest is always on. The
Python hook also refuses ctypes, symlinks and hard links, and the gc functions that could reach its own state.
Gaps: Landlock does not cover metadata (chmod, chown, utime of files outside; the hook refuses them), nor UDP or
unix sockets (the network namespace and the hook do); RLIMIT_NPROC does not bind root (the hook refuses fork and
subprocesses, and the process group is killed at the end). A program that calls ``sys.exit(0)`` before its tests
run passes, as in nanochat (success is exit status 0). This is a guard for evaluating model output, not a jail for
hostile code: a container or VM is that. Linux gets every layer its kernel allows; on macOS only the hook, the
clock, RLIMIT_CPU and RLIMIT_FSIZE apply; Windows is not supported (no `resource` module).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

GUARD = Path(__file__).with_name("sandbox_guard.py")
SETUP_FAILED = 121  # sandbox_guard.SETUP_FAILED (the guard is a standalone script, it cannot import us)
MAX_FILE_BYTES = 16 * 2**20  # per file written, stdout and stderr included
KEEP_OUTPUT = 20_000  # characters of stdout/stderr kept in the result


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False
    returncode: int | None = None


def execute_code(code: str, timeout: float = 5.0, memory_bytes: int | None = 256 * 2**20, *,
                 kernel_layers: bool = True, python_guard: bool = True) -> ExecutionResult:
    """Run ``code`` as a program in the sandbox. ``kernel_layers`` / ``python_guard`` switch the two layers
    (both on by default; tests turn one off to check the other alone)."""
    caps = capabilities() if kernel_layers else {"netns": False, "landlock_abi": 0}
    return _run(code, timeout, memory_bytes, netns=caps["netns"], landlock=caps["landlock_abi"],
                python_guard=python_guard)


@functools.cache
def capabilities() -> dict:
    """Which kernel layers work here: ``netns`` (a private network namespace), ``landlock_abi`` (0 = none), and
    ``nproc_enforced`` (RLIMIT_NPROC, which the kernel does not apply to root)."""
    caps = {"netns": False, "landlock_abi": 0, "nproc_enforced": _nproc_limit() is not None, "python_guard": True}
    if not sys.platform.startswith("linux"):
        return caps
    abi = _landlock_abi()
    for key, value, kw in (("netns", True, {"netns": True}), ("landlock_abi", abi, {"landlock": abi})):
        if value and _run("pass", 10.0, 256 * 2**20, **{"netns": False, "landlock": 0, **kw}).returncode == 0:
            caps[key] = value
    return caps


def _landlock_abi() -> int:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        abi = libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1))  # ..._CREATE_RULESET_VERSION
    except (OSError, AttributeError):
        return 0
    return max(int(abi), 0)


def _run(code: str, timeout: float, memory_bytes: int | None, *, netns: bool, landlock: int,
         python_guard: bool = True) -> ExecutionResult:
    with tempfile.TemporaryDirectory(prefix="sandbox_", ignore_cleanup_errors=True) as root:
        root = os.path.realpath(root)  # the guard compares paths as strings: no symlink in the work dir's path
        workdir = os.path.join(root, "work")
        os.mkdir(workdir)
        program = os.path.join(root, "program.py")  # outside the work dir: the program cannot rewrite itself
        Path(program).write_text(code, encoding="utf-8")
        cfg = {"workdir": workdir, "program": program, "netns": netns, "landlock": landlock,
               "python_guard": python_guard, "memory_bytes": memory_bytes, "max_file_bytes": MAX_FILE_BYTES,
               "cpu_seconds": math.ceil(timeout) + 1, "nproc": _nproc_limit()}
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-I", str(GUARD), json.dumps(cfg)], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True)  # own process group: one kill ends all of it
            try:
                returncode, timed_out = process.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            finally:
                _kill_group(process)
        stdout, stderr = _tail(out_path), _tail(err_path)
    if returncode == SETUP_FAILED and "sandbox setup failed" in stderr:
        raise RuntimeError(f"the sandbox could not be set up: {stderr.strip()}")
    if timed_out:
        return ExecutionResult(False, stdout, stderr, "Execution timed out (process killed)", timeout=True)
    success = returncode == 0
    error = None if success else (stderr.strip().splitlines() or [f"exit status {returncode}"])[-1]
    return ExecutionResult(success, stdout, stderr, error, memory_exceeded="MemoryError" in stderr,
                           returncode=returncode)


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the program and anything it started (they share its process group), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _tail(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - 4 * KEEP_OUTPUT, 0))
        return f.read().decode("utf-8", "replace")[-KEEP_OUTPUT:]


def _nproc_limit() -> int | None:
    """RLIMIT_NPROC counts every task (process or thread) of the user: allow what runs now plus a few. None where
    it would not bind (root) or the count is unknown (no /proc)."""
    if os.geteuid() == 0 or not os.path.isdir("/proc/self"):
        return None
    uid, tasks = os.getuid(), 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue  # the process ended meanwhile
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            tasks += int(fields.get("Threads", "1"))
    return tasks + 32
