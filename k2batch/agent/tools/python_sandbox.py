"""The `python` tool: run model-written code in a confined, short-lived subprocess.

Threat model. The code comes from a model, not from an adversary who studies this file: the aim
is to contain mistakes and naive misuse (reading /etc or a user's files, calling a web API,
fork bombs, runaway loops or allocations, floods of output), not to be a security boundary.
The barriers, from strongest to weakest:

* The OS. A child in its own session (its process group is killed at the wall-time limit, and
  it is killed if the parent dies) with rlimits on CPU time, address space, file size, open
  files and processes, no core dumps, an empty environment, stdin from /dev/null, and a fresh
  temporary working directory that is deleted afterwards. Where the kernel allows it (as root,
  or with unprivileged user namespaces, unless a container forbids unshare(2)) the child moves
  into a new, empty network namespace: only a loopback interface that is down, so no address
  is reachable. network_isolation() says which applies; a warning is logged when none does.
* An audit hook (`sys.addaudithook`), installed by the bootstrap before the user code is
  compiled. It refuses sockets, ctypes, subprocesses, fork/exec, signals to other processes,
  links, rlimit changes and gc introspection (the way to reach the hook), and allows file
  access only inside the working directory, plus read-only access to the interpreter's stdlib
  directories (the `-I -S` sys.path) so imports work. Its state lives in the function's
  defaults and it is referenced from nowhere user code can reach, so it cannot be removed or
  edited in an obvious way. It is still Python checking Python: code that sets out to defeat it
  (for instance by monkeypatching the stdlib path helpers it calls) may well succeed. As root,
  without the hook, the child could read any file; a deployment that needs a hard file-system
  boundary must also run the batch as an unprivileged user or in a container.

Limits are applied by the bootstrap inside the child, after exec, rather than in a preexec_fn:
tools run on a thread pool, and preexec_fn is unsafe in a multi-threaded parent.
"""

import functools
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from .context import ToolContext, ToolSettings
from .registry import TOOLS

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 << 20  # RLIMIT_FSIZE: enough for scratch files, not for filling the disk
MAX_OPEN_FILES = 64
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000

# Runs as `python -I -S -c _BOOTSTRAP workdir parent_pid cpu_s memory_bytes file_bytes open_files net_flags`
# with the working directory as cwd and the user code in ./main.py.
_BOOTSTRAP = r"""
import os, resource, sys

workdir = sys.argv[1]
parent, cpu_s, memory_bytes, file_bytes, open_files, net_flags = map(int, sys.argv[2:8])
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
# Die with the parent, even if it exits without waiting for us (PR_SET_PDEATHSIG = 1). The
# signal comes when the thread that started us ends; run_python waits for us in that thread.
if libc.prctl(1, 9, 0, 0, 0) != 0 or os.getppid() != parent:
    sys.stderr.write("sandbox: cannot tie this process to its parent's lifetime\n")
    os._exit(70)
if net_flags and libc.unshare(net_flags) != 0:
    sys.stderr.write(f"sandbox: cannot isolate the network (errno {ctypes.get_errno()})\n")
    os._exit(70)
del ctypes, libc
for name in [m for m in sys.modules if m == "_ctypes" or m.split(".")[0] == "ctypes"]:
    del sys.modules[name]
for limit, soft, hard in (
    (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),  # SIGXCPU at soft, SIGKILL at hard if it is ignored
    (resource.RLIMIT_AS, memory_bytes, memory_bytes),
    (resource.RLIMIT_FSIZE, file_bytes, file_bytes),
    (resource.RLIMIT_NOFILE, open_files, open_files),
    (resource.RLIMIT_NPROC, 0, 0),
    (resource.RLIMIT_CORE, 0, 0),
):
    resource.setrlimit(limit, (soft, hard))
os.environ["TMPDIR"] = os.environ["HOME"] = workdir
with open("main.py", encoding="utf-8") as file:
    source = file.read()


def install_guard(workdir, read_roots):
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    refused = frozenset({
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "os.link", "os.symlink",
        "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "sys._current_frames", "sqlite3.enable_load_extension",
        "sqlite3.load_extension",
    })
    blocked_modules = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters"})
    # event -> (how many leading arguments are paths, whether the event writes)
    path_events = {
        "open": (1, False), "os.listdir": (1, False), "os.scandir": (1, False),
        "os.chdir": (1, False), "os.getxattr": (1, False), "os.listxattr": (1, False),
        "os.chmod": (1, True), "os.chown": (1, True), "os.mkdir": (1, True),
        "os.remove": (1, True), "os.rmdir": (1, True), "os.truncate": (1, True),
        "os.utime": (1, True), "os.setxattr": (1, True), "os.removexattr": (1, True),
        "os.chflags": (1, True), "os.lchflags": (1, True), "shutil.rmtree": (1, True),
        "os.rename": (2, True), "sqlite3.connect": (1, True),
    }

    # Everything the guard uses is bound as a default: user code can rebind module globals and
    # builtins, but cannot reach this function to change its defaults.
    def guard(event, args, *, _refused=refused, _blocked=blocked_modules, _paths=path_events,
              _prefixes=("socket.", "ctypes."), _workdir=workdir + "/", _roots=tuple(read_roots),
              _write_flags=write_flags, _denied=PermissionError, _type=type, _str=str,
              _bytes=bytes, _int=int, _fsdecode=os.fsdecode, _realpath=os.path.realpath,
              _join=os.path.join, _getcwd=os.getcwd, _isdir=os.path.isdir):
        if event in _refused or event.startswith(_prefixes):
            raise _denied(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] in _blocked:
            raise _denied(f"sandbox: importing {args[0]} is not allowed")
        if event == "object.__setattr__" and args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
            raise _denied(f"sandbox: setting {args[1]} is not allowed")
        spec = _paths.get(event)
        if spec is None:
            return
        count, write = spec
        if event == "open":
            mode, flags = args[1], args[2]
            write = bool((flags or 0) & _write_flags) or (
                _type(mode) is _str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)
            )
        if event == "sqlite3.connect" and args[0] in (":memory:", "", b":memory:", b""):
            return
        for path in args[:count]:
            kind = _type(path)
            if kind is _int:  # an already open descriptor: one this process was allowed to open
                continue
            if kind is not _str and kind is not _bytes:
                raise _denied(f"sandbox: {event} needs a str or bytes path")
            name = _fsdecode(path)
            if event == "sqlite3.connect" and name.startswith("file:"):
                raise _denied("sandbox: sqlite URIs are not allowed; pass a file name")
            full = _realpath(_join(_getcwd(), name))
            if (full + "/").startswith(_workdir):
                continue
            if event == "open" and _isdir(full):
                # A descriptor of an outside directory would let dir_fd calls escape this check.
                raise _denied(f"sandbox: opening the directory {full!r} is not allowed")
            if not write:
                for root in _roots:
                    if full == root or full.startswith(root + "/"):
                        break
                else:
                    raise _denied(f"sandbox: {full!r} is outside the working directory")
                continue
            raise _denied(f"sandbox: {full!r} is read-only; write in the working directory")

    sys.addaudithook(guard)


install_guard(workdir, [os.path.realpath(p) for p in sys.path if p])
del install_guard

main = type(sys)("__main__")
main.__dict__["__builtins__"] = __builtins__
sys.modules["__main__"] = main
code = compile(source, "main.py", "exec")
del source
try:
    exec(code, main.__dict__)
except SystemExit:
    raise
except BaseException as error:
    error.__traceback__ = error.__traceback__.tb_next  # the bootstrap's frame is noise to the model
    sys.excepthook(type(error), error, error.__traceback__)
    raise SystemExit(1)
"""


def _command(workdir: str, settings: ToolSettings, net_flags: int) -> list[str]:
    cpu_s = math.ceil(settings.python_cpu_s)
    numbers = [os.getpid(), cpu_s, settings.python_memory_mb << 20, MAX_FILE_BYTES, MAX_OPEN_FILES, net_flags]
    # -I: no user site, no PYTHON* variables, no script dir on sys.path; -S: no site-packages;
    # -B: no .pyc writes; -u: unbuffered, so prints and tracebacks interleave as they happen.
    return [sys.executable, "-I", "-S", "-B", "-u", "-c", _BOOTSTRAP, workdir, *map(str, numbers)]


def _remove_tree(path: str) -> None:
    # User code may have made directories unreadable; make them ours again before deleting.
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700, follow_symlinks=False)
    shutil.rmtree(path)


def _collect(proc: subprocess.Popen[bytes], end: float, keep_bytes: int) -> tuple[bytes, int, bool]:
    """Read the child's output until it exits or `end`; keep at most `keep_bytes` of it.

    Returns (kept bytes, total bytes, whether the wall-time limit killed the child).
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    kept = bytearray()
    total = 0
    killed = False
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    killed = True
                    break
                if not selector.select(remaining):
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                total += len(chunk)
                # Past the cap the output is read and dropped, so a flood cannot block the child
                # on a full pipe or fill this process's memory.
                kept += chunk[: max(0, keep_bytes - len(kept))]
        if not killed:
            try:
                proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed = True
    finally:
        # Still running: past its time, or reading failed. poll() first, so that a group id
        # that may already be reused is never signalled.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own group: kill all of it
            proc.wait()
        proc.stdout.close()
    return bytes(kept), total, killed


def _status(returncode: int, killed: bool, by_deadline: bool, settings: ToolSettings) -> str:
    if killed and by_deadline:
        return "[killed: the tool call's time limit was reached]"
    if killed:
        return f"[killed: wall time limit of {settings.python_wall_s:g} s exceeded]"
    if returncode == -signal.SIGXCPU:
        return f"[killed: CPU time limit of {math.ceil(settings.python_cpu_s)} s exceeded]"
    if returncode < 0:
        return f"[killed by signal {signal.Signals(-returncode).name}]"
    return f"[exit status {returncode}]" if returncode else ""


def run_python(
    code: str, settings: ToolSettings, deadline: float | None = None, net_flags: int | None = None
) -> str:
    """Run `code` in the sandbox; return its output, a truncation marker, and a status line.

    The run ends at settings.python_wall_s or at `deadline` (time.monotonic()), whichever
    comes first. `net_flags` overrides the probed network-namespace flags (0: none).
    """
    net_flags = network_isolation() if net_flags is None else net_flags
    wall_end = time.monotonic() + settings.python_wall_s
    end = wall_end if deadline is None else min(wall_end, deadline)
    by_deadline = end < wall_end
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="k2batch-python-"))
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as file:
            file.write(code)
        proc = subprocess.Popen(
            _command(workdir, settings, net_flags),
            cwd=workdir,
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # Four bytes per character is the most UTF-8 needs, so the cap in characters fits.
        kept, total, killed = _collect(proc, end, 4 * settings.python_output_chars)
    finally:
        _remove_tree(workdir)
    text = kept.decode("utf-8", errors="replace")
    cap = settings.python_output_chars
    parts = [text[:cap]]
    if len(text) > cap or total > len(kept):
        parts.append(f"[output truncated: showing the first {cap:,} characters of {total:,} bytes]")
    parts.append(_status(proc.returncode, killed, by_deadline, settings))
    result = "\n".join(part.rstrip("\n") for part in parts if part)
    return result or "(no output)"


@functools.cache
def network_isolation() -> int:
    """The unshare(2) flags that give the child an empty network namespace here, or 0 if none do."""
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET
    output = run_python("", ToolSettings(), net_flags=flags)
    if output == "(no output)":
        return flags
    log.warning("python tool: no network namespace here (%s); only the audit hook refuses sockets", output)
    return 0


@TOOLS.tool(
    name="python",
    description="Run a Python 3 program and return what it prints (stdout and stderr). Standard "
    "library only; no network; files only in its own temporary working directory; limited time "
    "and memory. Each call starts fresh: print everything you need.",
    parameters={
        "type": "object",
        "properties": {"code": {"type": "string", "description": "the program's source code"}},
        "required": ["code"],
    },
)
def python(args: dict[str, Any], ctx: ToolContext) -> str:
    return run_python(args["code"], ctx.settings, ctx.deadline)
