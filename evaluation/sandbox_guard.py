"""The inside of the HumanEval sandbox: run as a script (``python -I sandbox_guard.py CONFIG_JSON``) in a fresh
subprocess, it locks the process down and then runs the untrusted program. Standard library only.

Order matters: limits first (so the rest runs under them), then the kernel layers, then the Python audit hook,
which also refuses ctypes calls, the tool the kernel layers needed. evaluation/sandbox.py launches this and documents
what each layer covers.
"""

import json
import os
import resource
import stat
import sys

SETUP_FAILED = 121  # exit status when a requested layer could not be applied (the parent raises)

# Landlock (linux/landlock.h). Filesystem rights we take away everywhere but the work dir: everything that writes.
_FS_WRITE = (1 << 1) | sum(1 << b for b in range(4, 13))  # WRITE_FILE, REMOVE_*, MAKE_* (char..sym)
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
_NET_TCP = (1 << 0) | (1 << 1)  # BIND_TCP, CONNECT_TCP (ABI 4)
_SCOPE = (1 << 0) | (1 << 1)  # abstract unix sockets, signals to processes outside the sandbox (ABI 6)
_SYS_CREATE, _SYS_ADD_RULE, _SYS_RESTRICT = 444, 445, 446  # same numbers on every architecture
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000


def set_limits(cfg):
    limits = [(resource.RLIMIT_CPU, cfg["cpu_seconds"]), (resource.RLIMIT_FSIZE, cfg["max_file_bytes"]),
              (resource.RLIMIT_CORE, 0)]
    if cfg["memory_bytes"] and sys.platform != "darwin":  # macOS refuses these limits (nanochat skips them too)
        limits += [(resource.RLIMIT_AS, cfg["memory_bytes"]), (resource.RLIMIT_DATA, cfg["memory_bytes"])]
    if cfg["nproc"]:
        limits.append((resource.RLIMIT_NPROC, cfg["nproc"]))
    for which, value in limits:
        resource.setrlimit(which, (value, value))


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def enter_network_namespace():
    """A new network namespace has only a loopback device, and it is down: no connection goes anywhere."""
    ctypes, libc = _libc()
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET  # unprivileged: via a user ns
    if libc.unshare(ctypes.c_int(flags)) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")


def restrict_filesystem(workdir, abi):
    """Landlock: from here on, this process and its children may create, write, truncate, rename or delete files
    only beneath ``workdir`` (and write /dev/null); with ABI >= 4 no TCP bind/connect; with ABI >= 6 no signals
    to processes outside the sandbox."""
    ctypes, libc = _libc()
    long = ctypes.c_long
    fs = _FS_WRITE | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    net = _NET_TCP if abi >= 4 else 0
    scope = _SCOPE if abi >= 6 else 0
    attr = (ctypes.c_uint64 * 3)(fs, net, scope)  # the kernel accepts the longer struct if unknown fields are 0
    ruleset = libc.syscall(long(_SYS_CREATE), ctypes.byref(attr), long(ctypes.sizeof(attr)), long(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    file_rights = (1 << 1) | (_FS_TRUNCATE if abi >= 3 else 0)  # the only write rights a non-directory can hold
    for path, rights in ((workdir, fs), (os.devnull, file_rights)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneath(rights, fd)
        if libc.syscall(long(_SYS_ADD_RULE), long(ruleset), long(1), ctypes.byref(rule), long(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path}) failed")
        os.close(fd)
    if libc.prctl(long(38), long(1), long(0), long(0), long(0)) != 0:  # PR_SET_NO_NEW_PRIVS, required first
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.syscall(long(_SYS_RESTRICT), long(ruleset), long(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)


# ----------------------------------------------------------------------------------------------------------------
# Python-level guard: an audit hook (PEP 578). It cannot be removed once added, and it sees the interpreter's own
# events (every open, os.remove, socket, fork, subprocess, ctypes call...). Everything it needs is captured here,
# so that monkeypatching os or posixpath later does not change its decisions.

_DENIED = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen", "pty.spawn",
    "os.kill", "os.killpg", "signal.pthread_kill", "os.symlink", "os.link", "os.chroot",
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.getnameinfo",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",  # ways to reach and edit the hook's own state
})
# ctypes itself stays importable (numpy imports it): it is loaded before the hook, and every ctypes.* event (dlopen,
# dlsym, calling a foreign function, reading raw memory) is refused
_DENIED_IMPORTS = frozenset({"_posixsubprocess", "cffi", "_cffi_backend"})
# event -> indices of its path arguments; every path must lie in the work dir, no dir_fd, no file descriptors
_PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.chmod": (0,),
    "os.chown": (0,), "os.chflags": (0,), "os.lchflags": (0,), "os.utime": (0,), "os.setxattr": (0,),
    "os.removexattr": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "shutil.rmtree": (0,), "os.chdir": (0,),
}
_DIR_FD_AT = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "os.rename": (2, 3), "os.chmod": 2, "os.chown": 3,
              "os.utime": 3, "shutil.rmtree": 1, "os.mkfifo": 2, "os.mknod": 3}


def install_audit_hook(workdir):
    import pathlib

    getcwd, fspath, stat_fn, s_isdir = os.getcwd, os.fspath, os.stat, stat.S_ISDIR
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    path_types = (str, bytes, pathlib.PosixPath, pathlib.PurePosixPath)
    root = workdir.rstrip("/")
    denied, denied_imports, path_events, dir_fd_at = _DENIED, _DENIED_IMPORTS, _PATH_EVENTS, _DIR_FD_AT

    def absolute(path):
        if type(path) not in path_types:
            return None  # an fd or an object whose __fspath__ could lie: the callers decide
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for part in path.split("/"):  # lexical normalisation: no symlink can exist in the work dir (see _DENIED)
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def inside(path):
        path = absolute(path)
        return path is not None and (path == root or path.startswith(root + "/"))

    def refuse(event, args):
        raise PermissionError(f"sandbox: {event}{tuple(args)!r:.200} is not allowed")

    def hook(event, args):
        if event == "open":
            path, flags = args[0], args[2] or 0
            if isinstance(path, int):
                return  # an fd that is already open
            if flags & write_flags:
                if not inside(path):
                    refuse(event, args)
            elif not inside(path):  # reading is fine, but not opening a directory outside (a dir_fd for *at calls)
                full = absolute(path)
                try:
                    is_dir = full is None or s_isdir(stat_fn(full).st_mode)
                except OSError:
                    is_dir = False  # it does not exist: the open fails by itself
                if is_dir:
                    refuse(event, args)
        elif event in denied or event.startswith("ctypes."):
            refuse(event, args)
        elif event == "import":
            if args[0] in denied_imports or args[0].split(".")[0] in denied_imports:
                refuse(event, args)
        elif event in path_events:
            for i in path_events[event]:
                if not inside(args[i]):
                    refuse(event, args)
            fd_at = dir_fd_at.get(event, ())
            for i in fd_at if isinstance(fd_at, tuple) else (fd_at,):
                if i < len(args) and args[i] not in (None, -1):  # -1: no dir_fd given
                    refuse(event, args)
        elif event == "os.truncate" and not isinstance(args[0], int) and not inside(args[0]):
            refuse(event, args)

    import ctypes  # noqa: F401 - loaded now: its import makes ctypes.* calls, which the hook refuses from here on

    sys.addaudithook(hook)


def main():
    cfg = json.loads(sys.argv[1])
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    try:
        set_limits(cfg)
        if cfg["netns"]:
            enter_network_namespace()
        if cfg["landlock"]:
            restrict_filesystem(cfg["workdir"], cfg["landlock"])
        if cfg["python_guard"]:
            install_audit_hook(cfg["workdir"])
    except Exception as e:  # noqa: BLE001 - any failure here means the sandbox is not what was asked for
        print(f"sandbox setup failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED)
    del cfg, f
    exec(compile(source, "<program>", "exec"), {"__name__": "__main__"})  # noqa: S102 - this is the sandbox


if __name__ == "__main__":
    main()
