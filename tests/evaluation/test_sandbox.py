"""The HumanEval sandbox stops what model-written code must not do, with each layer on its own where possible:
the Python audit hook alone, the kernel layers alone (Landlock, network namespace, rlimits; only where this kernel
has them), and both together (the default)."""

import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import FIXTURES, REPO

from evaluation.sandbox import capabilities, execute_code
from evaluation.tasks.humaneval import build_program

CAPS = capabilities()
BOTH, PYTHON, KERNEL = "both", "python-only", "kernel-only"


def run(layers, code, **kw):
    if layers == KERNEL and not CAPS["landlock_abi"]:
        pytest.skip("this kernel has no Landlock (or it is blocked): the kernel layers cannot be checked alone")
    return execute_code(code, kernel_layers=layers != PYTHON, python_guard=layers != KERNEL, **kw)


def guard_processes():
    """Processes still running the sandbox's guard script (none may outlive execute_code)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"sandbox_guard.py" in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:
            pass
    return found


@pytest.fixture
def victim(tmp_path):
    """A directory outside the sandbox with one file; yields a checker that it is untouched."""
    d = tmp_path / "victim"
    d.mkdir()
    (d / "keep.txt").write_text("precious\n")

    def intact():
        return sorted(os.listdir(d)) == ["keep.txt"] and (d / "keep.txt").read_text() == "precious\n"

    yield d, intact


ESCAPES = {
    "open-write": "open({f!r}, 'w').write('gone')",
    "open-append": "open({f!r}, 'a').write('more')",
    "open-create": "open({d!r} + '/new.txt', 'x').write('new')",
    "os.open": "import os\nfd = os.open({f!r}, os.O_WRONLY | os.O_TRUNC)\nos.write(fd, b'gone')",
    "os.open-dirfd": "import os\nd = os.open({d!r}, os.O_RDONLY)\n"
                     "os.write(os.open('new.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d), b'x')",
    "relative-path": "open('../' * 30 + {f!r}.lstrip('/'), 'w').write('gone')",
    "os.remove": "import os\nos.remove({f!r})",
    "os.rename": "import os\nos.rename({f!r}, 'stolen.txt')",
    "shutil.rmtree": "import shutil\nshutil.rmtree({d!r})",
    "pathlib": "import pathlib\npathlib.Path({f!r}).unlink()",
    "subprocess-rm": "import subprocess\nsubprocess.run(['rm', '-rf', {d!r}], check=True)",
    "subprocess-sh": "import subprocess\nsubprocess.run(['sh', '-c', 'echo gone > ' + {f!r}], check=True)",
    "os.system": "import os\nassert os.system('rm -rf ' + {d!r}) == 0",
    "symlink": "import os\nos.symlink({f!r}, 'link')\nopen('link', 'w').write('gone')",
}


@pytest.mark.parametrize("layers", [BOTH, PYTHON, KERNEL])
@pytest.mark.parametrize("name", list(ESCAPES))
def test_no_writes_or_deletes_outside(layers, name, victim):
    d, intact = victim
    result = run(layers, ESCAPES[name].format(d=str(d), f=str(d / "keep.txt")))
    assert intact(), f"{name} changed {d} ({layers}): {result}"
    assert not result.success, result


@pytest.mark.parametrize("layers", [BOTH, PYTHON, KERNEL])
def test_writes_inside_the_work_dir_work(layers):
    code = ("import os, tempfile\nos.mkdir('d')\nopen('d/a.txt', 'w').write('x')\nos.rename('d/a.txt', 'd/b.txt')\n"
            "with tempfile.NamedTemporaryFile('w') as t:\n    t.write('y')\nos.remove('d/b.txt')\nos.rmdir('d')\n"
            "print(sorted(os.listdir('.')))")
    result = run(layers, code)
    assert result.success, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.fixture
def loopback_server():
    """A TCP server on 127.0.0.1 that records every connection it accepts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(conn.recv(100))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("layers", [BOTH, PYTHON, KERNEL])
def test_no_network(layers, loopback_server):
    port, accepted = loopback_server
    probe = socket.create_connection(("127.0.0.1", port), timeout=5)  # the server does accept connections
    probe.sendall(b"probe")
    probe.close()
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')\n"
            "s.close()")
    if layers == KERNEL and not CAPS["netns"] and CAPS["landlock_abi"] < 4:
        pytest.skip("neither a network namespace nor Landlock >= 4 (TCP rules) is available here")
    result = run(layers, code)
    assert not result.success
    if layers != KERNEL or CAPS["netns"]:  # UDP: Landlock has no rules for it, the namespace and the hook do
        udp = f"import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))"
        assert not run(layers, udp).success
    threading.Event().wait(0.5)  # let the server thread drain anything that arrived
    assert b"leak" not in accepted and b"probe" in accepted


@pytest.mark.parametrize("layers", [BOTH, PYTHON, KERNEL])
@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    os.fork()",
    "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'while True: pass'])",
    "import multiprocessing as mp\nwhile True:\n    mp.Process(target=sum, args=([],)).start()",
], ids=["os.fork", "subprocess", "multiprocessing"])
def test_fork_bombs(layers, code):
    if layers == KERNEL and not CAPS["nproc_enforced"]:
        # root is exempt from RLIMIT_NPROC, so check the kernel layers alone from an unprivileged user, as a real
        # deployment runs them (CI runs as root)
        success = _run_as_nobody(code)
    else:
        success = run(layers, code, timeout=3).success
    assert not success
    assert guard_processes() == []


def _run_as_nobody(code):
    import sys
    script = ("import json, sys\nfrom evaluation.sandbox import execute_code\n"
              "r = execute_code(sys.stdin.read(), kernel_layers=True, python_guard=False, timeout=3)\n"
              "print(json.dumps(r.success))")
    repo = REPO
    # the sandbox needs only the standard library; the system interpreter is one an unprivileged user can run
    # (a venv's python may point into root's home)
    python = next((c for c in ("/usr/bin/python3", sys.executable) if os.access(c, os.X_OK)), sys.executable)
    p = subprocess.run([python, "-c", script], input=code, capture_output=True, text=True, timeout=60,
                       user=65534, group=65534, extra_groups=[], cwd="/tmp",
                       env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(repo), "HOME": "/tmp"})
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layers", [BOTH, PYTHON, KERNEL])
@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(1000)",
                                  "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                  "while True:\n    pass"],
                         ids=["busy", "sleep", "ignores-SIGTERM"])
def test_infinite_loops_are_killed(layers, code):
    result = run(layers, code, timeout=0.5)
    assert result.timeout and not result.success
    assert guard_processes() == []


@pytest.mark.parametrize("layers", [BOTH, KERNEL])
@pytest.mark.parametrize("code", ["x = bytearray(2**31)", "x = 'a' * 2**33",
                                  "x = []\nwhile True:\n    x.append(bytearray(2**20))"],
                         ids=["one-block", "huge-str", "growing"])
def test_memory_bombs(layers, code):
    result = run(layers, code, timeout=10, memory_bytes=128 * 2**20)
    assert not result.success and result.memory_exceeded and not result.timeout, result.error


def test_output_flood_is_cut():
    result = execute_code("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout=10)
    assert not result.success and not result.timeout  # killed by RLIMIT_FSIZE, not by the clock
    assert len(result.stdout) <= 20_000


@pytest.mark.parametrize("layers", [BOTH, PYTHON, KERNEL])
def test_cannot_signal_other_processes(layers):
    if layers == KERNEL and CAPS["landlock_abi"] < 6:
        pytest.skip("signal scoping needs Landlock ABI 6")
    other = subprocess.Popen(["sleep", "60"])
    try:
        result = run(layers, f"import os, signal\nos.kill({other.pid}, signal.SIGKILL)")
        assert not result.success and other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_correct_solution_passes_wrong_one_fails():
    rows = [json.loads(line) for line in (FIXTURES / "nanochat_chat_eval" / "data" / "humaneval.jsonl").open()]
    for row in rows:
        conv = {"messages": [{"role": "user", "content": row["prompt"]}], "test": row["test"],
                "entry_point": row["entry_point"]}
        good = execute_code(build_program(conv, row["prompt"] + row["canonical_solution"]))
        assert good.success, good.stderr
        bad = execute_code(build_program(conv, row["prompt"] + "    return None\n"))
        assert not bad.success and "AssertionError" in bad.error


def test_stdout_stderr_and_exit_status():
    result = execute_code("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)")
    assert (result.success, result.stdout, result.stderr.strip(), result.returncode) == (False, "out\n", "err", 3)
    result = execute_code("import numpy, json, math, typing, collections\nprint(numpy.arange(4).sum())")
    assert result.success and result.stdout == "6\n", result.stderr
