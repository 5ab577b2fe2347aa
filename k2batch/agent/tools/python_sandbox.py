"""The `python` tool: run model-written code in an isolated, short-lived process.

Threat model. The code comes from a model, and the model reads inputs that anyone able to drop a
file into the bucket may have written: treat the code as an adversary's. What it must not reach:
the batch process and its environment (credentials), other processes, the network, the project
tree and the inputs, any file outside its own scratch folder; nor may it outlast its call or
exhaust the machine. The layers, from the outside in:

* bubblewrap (`bwrap`, Debian's package; `make install` installs it). The interpreter runs as uid
  65534 in new user, mount, PID, network, IPC, UTS and cgroup namespaces (outside them it is the
  batch's own uid, holding no capability), with no capabilities and no way to create further user
  namespaces. Its file system is a fresh root holding, read-only,
  /usr (with the /bin, /lib, ... links) and the interpreter's own prefix, a minimal /dev, a /proc
  of its own PID namespace (no other process is visible, the batch's included), and a private
  writable tmpfs of MAX_WORK_BYTES at /sandbox with the code in it; nothing else. The network
  namespace has only its own loopback interface. bwrap dies with the thread that started it, and
  the namespace's processes die with it.
* Resource limits, set by the bootstrap in the child: CPU time, address space, file size, open
  files, no further processes, no core dumps; the wall time is enforced from outside, by
  killing the whole process group. The environment is empty, stdin is /dev/null, and output past
  the cap is read and dropped.
* An audit hook (`sys.addaudithook`), installed before the user code is compiled: it refuses
  sockets, ctypes, subprocesses, fork/exec, signals, links, rlimit changes and gc introspection,
  and allows file access only inside the working directory plus reads of the stdlib. It is
  Python checking Python, and ordinary stdlib calls can walk around it (os.mkfifo, pidfd signals,
  a replaced os.fspath): it is an inner layer, never the wall.

Without bubblewrap (not installed, or the kernel or a container forbids its namespaces) the tool
refuses to run, with an error saying why, unless the batch config sets
tools.python.allow_weaker_sandbox = true. The weaker sandbox keeps what the kernel gives without
bubblewrap: run by root, the child drops to uid 65534 (so it cannot signal, renice or read the
environment of the batch or of any process of another user, create device nodes, or write where that
uid cannot; it can read what any user can); run by another user, it keeps that user's uid, and only the
audit hook and the limits stand between it and the batch's files and processes. Where the kernel
allows, it also gets an empty network namespace. sandbox() says which applies here.

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
from typing import Any, Literal

import msgspec

from .context import ToolContext, ToolSettings
from .registry import TOOLS

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 << 20  # RLIMIT_FSIZE: enough for scratch files, not for filling the disk
MAX_WORK_BYTES = 64 << 20  # size of the working directory's tmpfs under bubblewrap
MAX_OPEN_FILES = 64
SANDBOX_UID = 65534  # nobody
WORKDIR = "/sandbox"  # the working directory inside bubblewrap's fresh root
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000

# Runs as `python -I -S -c _BOOTSTRAP workdir cpu_s memory_bytes file_bytes open_files parent_pid net_flags`
# with the working directory as cwd and the user code in ./main.py. parent_pid 0: bubblewrap ties the
# child to the batch instead; net_flags 0: no unshare here.
_BOOTSTRAP = r"""
import os, resource, sys

workdir = sys.argv[1]
cpu_s, memory_bytes, file_bytes, open_files, parent, net_flags = map(int, sys.argv[2:8])
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
# Die with the parent, even if it exits without waiting for us (PR_SET_PDEATHSIG = 1). The
# signal comes when the thread that started us ends; run_python waits for us in that thread.
if parent and (libc.prctl(1, 9, 0, 0, 0) != 0 or os.getppid() != parent):
    sys.stderr.write("sandbox: cannot tie this process to its parent's lifetime\n")
    os._exit(70)
if net_flags and libc.unshare(net_flags) != 0:
    sys.stderr.write(f"sandbox: cannot isolate the network (errno {ctypes.get_errno()})\n")
    os._exit(70)
# No exec can gain privileges (PR_SET_NO_NEW_PRIVS = 38); bubblewrap sets it too.
if libc.prctl(38, 1, 0, 0, 0) != 0:
    sys.stderr.write("sandbox: cannot set no_new_privs\n")
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
os.environ.clear()
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


class SandboxUnavailable(RuntimeError):
    """The python tool cannot get the isolation it promises here, and the config does not accept less."""


class Sandbox(msgspec.Struct, frozen=True, kw_only=True):
    """How the child is isolated on this machine."""

    kind: Literal["bubblewrap", "kernel"]
    python: str = msgspec.field(default_factory=lambda: os.path.realpath(sys.executable))
    """The interpreter that runs the code (its standard library only)."""
    bwrap: str = ""
    """bubblewrap: the bwrap executable."""
    uid: int | None = None
    """kernel: the uid the child runs as (SANDBOX_UID when the batch runs as root); None: the batch's own."""
    net_flags: int = 0
    """kernel: the unshare(2) flags that give the child an empty network namespace (0: none)."""
    problem: str = ""
    """kernel: why bubblewrap is not used."""
    unusable: str = ""
    """kernel: why this sandbox cannot run either ("" when it can)."""

    def describe(self) -> str:
        """What holds, in a line for logs."""
        if self.kind == "bubblewrap":
            return f"bubblewrap ({self.bwrap}): uid {SANDBOX_UID}, own user/mount/PID/network namespaces"
        who = f"uid {self.uid}" if self.uid is not None else "the batch's own uid"
        network = "an empty network namespace" if self.net_flags else "the host's network (the audit hook refuses it)"
        return f"the weaker sandbox (no bubblewrap: {self.problem}): {who}, {network}"


def _bwrap_command(box: Sandbox, code_fd: int, settings: ToolSettings) -> list[str]:
    command = [
        box.bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--hostname",
        "sandbox",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):  # merged-/usr links, or directories
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    # The interpreter's prefix (its stdlib, its libpython) when it lives outside /usr, as a pyenv or conda one does;
    # this process's base prefix too, for a venv whose interpreter is a copy.
    prefixes = {os.path.dirname(os.path.dirname(box.python))}
    if box.python == os.path.realpath(sys.executable):
        prefixes.add(os.path.realpath(sys.base_prefix))
    for prefix in sorted(prefixes):
        if prefix != "/usr" and not prefix.startswith("/usr/"):
            command += ["--ro-bind", prefix, prefix]
    command += [
        "--ro-bind-try",
        "/etc/ld.so.cache",
        "/etc/ld.so.cache",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--size",
        str(MAX_WORK_BYTES),
        "--tmpfs",
        WORKDIR,
        "--file",
        str(code_fd),
        f"{WORKDIR}/main.py",
        "--chdir",
        WORKDIR,
        "--clearenv",
        "--",
    ]
    return command + _python_command(box.python, WORKDIR, settings, parent=0, net_flags=0)


def _python_command(python: str, workdir: str, settings: ToolSettings, *, parent: int, net_flags: int) -> list[str]:
    cpu_s = math.ceil(settings.python_cpu_s)
    numbers = [cpu_s, settings.python_memory_mb << 20, MAX_FILE_BYTES, MAX_OPEN_FILES, parent, net_flags]
    # -I: no user site, no PYTHON* variables, no script dir on sys.path; -S: no site-packages;
    # -B: no .pyc writes; -u: unbuffered, so prints and tracebacks interleave as they happen.
    return [python, "-I", "-S", "-B", "-u", "-c", _BOOTSTRAP, workdir, *map(str, numbers)]


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
        # that may already be reused is never signalled. Under bubblewrap the group is bwrap's:
        # its death takes the PID namespace, and every process in it, down.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
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


def _start(box: Sandbox, code: str, settings: ToolSettings, workdir: str | None) -> subprocess.Popen[bytes]:
    """The child, running `code`: under bwrap (the code handed over on a descriptor), or in `workdir`."""
    pipes: dict[str, Any] = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if box.kind == "bubblewrap":
        code_fd = os.memfd_create("main.py")
        try:
            os.write(code_fd, code.encode("utf-8"))
            os.lseek(code_fd, 0, os.SEEK_SET)
            command = _bwrap_command(box, code_fd, settings)
            return subprocess.Popen(command, env={}, pass_fds=(code_fd,), start_new_session=True, **pipes)
        finally:
            os.close(code_fd)
    assert workdir is not None
    with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as file:
        file.write(code)
    command = _python_command(box.python, workdir, settings, parent=os.getpid(), net_flags=box.net_flags)
    user: dict[str, Any] = {}
    if box.uid is not None:
        for path in (workdir, os.path.join(workdir, "main.py")):
            os.chown(path, box.uid, box.uid)
        user = dict(user=box.uid, group=box.uid, extra_groups=[])
    return subprocess.Popen(command, cwd=workdir, env={}, start_new_session=True, **pipes, **user)


def _run(box: Sandbox, code: str, settings: ToolSettings, deadline: float | None) -> str:
    wall_end = time.monotonic() + settings.python_wall_s
    end = wall_end if deadline is None else min(wall_end, deadline)
    by_deadline = end < wall_end
    workdir = None if box.kind == "bubblewrap" else os.path.realpath(tempfile.mkdtemp(prefix="k2batch-python-"))
    try:
        proc = _start(box, code, settings, workdir)
        # Four bytes per character is the most UTF-8 needs, so the cap in characters fits.
        kept, total, killed = _collect(proc, end, 4 * settings.python_output_chars)
    finally:
        if workdir is not None:
            _remove_tree(workdir)
    text = kept.decode("utf-8", errors="replace")
    cap = settings.python_output_chars
    parts = [text[:cap]]
    if len(text) > cap or total > len(kept):
        parts.append(f"[output truncated: showing the first {cap:,} characters of {total:,} bytes]")
    returncode = proc.returncode
    if box.kind == "bubblewrap" and returncode > 128:
        # bwrap exits with 128 + N when the code died of signal N (a program exiting with such a status reads the same).
        returncode = -(returncode - 128)
    parts.append(_status(returncode, killed, by_deadline, settings))
    result = "\n".join(part.rstrip("\n") for part in parts if part)
    return result or "(no output)"


def _problem(box: Sandbox) -> str | None:
    """Why `box` cannot run a program here, or None when it can."""
    try:
        output = _run(box, "print(6 * 7)", ToolSettings(), None)
    except OSError as error:  # the interpreter cannot be started as that user, say
        return f"{type(error).__name__}: {error}"
    return None if output == "42" else output.replace("\n", " ")


def bubblewrap(bwrap: str = "bwrap") -> Sandbox | str:
    """The bubblewrap sandbox, or why it cannot run here."""
    found = shutil.which(bwrap)
    if found is None:
        return f"{bwrap} is not installed (Debian: apt-get install bubblewrap; `make install` does it)"
    box = Sandbox(kind="bubblewrap", bwrap=found)
    problem = _problem(box)
    return box if problem is None else f"{found} fails here: {problem}"


def weaker_sandbox(problem: str, python: str | None = None) -> Sandbox:
    """What the kernel gives without bubblewrap: uid 65534 when run by root, a network namespace where allowed.
    `unusable` says why, if even this cannot run here."""
    uid = SANDBOX_UID if os.geteuid() == 0 else None
    box = Sandbox(kind="kernel", uid=uid, net_flags=_CLONE_NEWUSER | _CLONE_NEWNET, problem=problem)
    if python is not None:
        box = msgspec.structs.replace(box, python=python)
    if _problem(box) is None:
        return box
    box = msgspec.structs.replace(box, net_flags=0)
    unusable = _problem(box)
    if unusable is not None and uid is not None:
        unusable = f"{box.python} cannot run as uid {uid} ({unusable}); it must be readable by every user"
    return msgspec.structs.replace(box, unusable=unusable or "")


@functools.cache
def sandbox() -> Sandbox:
    """The sandbox of this machine: bubblewrap where it runs, else the weaker one (probed once per process)."""
    found = bubblewrap()
    box = found if isinstance(found, Sandbox) else weaker_sandbox(found)
    log.info("python tool: %s", box.describe())
    return box


def require_sandbox(settings: ToolSettings) -> Sandbox:
    """The sandbox the python tool runs in; SandboxUnavailable when only the weaker one is here and the settings
    do not accept it, or when none can run."""
    box = sandbox()
    if box.kind == "bubblewrap":
        return box
    if not settings.python_allow_weaker_sandbox:
        raise SandboxUnavailable(
            f"the python tool needs bubblewrap to isolate model-written code, and {box.problem}. Install it, or "
            "accept the weaker sandbox (README, section Sandbox) with tools.python.allow_weaker_sandbox = true "
            "in the batch config"
        )
    if box.unusable:
        raise SandboxUnavailable(f"the python tool cannot run here: {box.problem}, and without it {box.unusable}")
    log.warning("python tool: %s", box.describe())
    return box


def run_python(code: str, settings: ToolSettings, deadline: float | None = None, box: Sandbox | None = None) -> str:
    """Run `code` in the sandbox; return its output, a truncation marker, and a status line.

    The run ends at settings.python_wall_s or at `deadline` (time.monotonic()), whichever comes first.
    `box` overrides this machine's sandbox (tests run both); without it, require_sandbox decides."""
    return _run(box or require_sandbox(settings), code, settings, deadline)


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
