"""The python tool's sandbox: output and limits in both sandboxes, the attacks a red-team pass tried (each one
run as the attack itself), the refusal to run without bubblewrap, and the same tests again as a plain user."""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2batch.agent import batch
from k2batch.agent.tools import TOOLS, ToolContext, ToolSettings, python_sandbox
from k2batch.agent.tools.python_sandbox import (
    SANDBOX_UID,
    Sandbox,
    SandboxUnavailable,
    bubblewrap,
    run_python,
    weaker_sandbox,
)

SETTINGS = ToolSettings(python_wall_s=5.0, python_cpu_s=1.0, python_memory_mb=256, python_output_chars=1000)
REPO = Path(__file__).resolve().parents[2]
CANARY = "k2batch-canary-secret-7f3a"
# Defeats the audit hook's path checks: every path it resolves now looks like one in the working directory.
HOOK_BYPASS = "import os\nwd = os.getcwd()\nos.fspath = lambda path: wd + '/x'\n"


@functools.cache
def the_weaker_sandbox() -> Sandbox | str:
    """The weaker sandbox with an interpreter uid 65534 can run (this one, or the system's), or why none can."""
    box = weaker_sandbox("bubblewrap left out by the test")
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if box.unusable and system:
        box = weaker_sandbox("bubblewrap left out by the test", os.path.realpath(system))
    return box.unusable or box


@pytest.fixture(params=["bubblewrap", "weaker"])
def box(request: pytest.FixtureRequest) -> Sandbox:
    found = bubblewrap() if request.param == "bubblewrap" else the_weaker_sandbox()
    if isinstance(found, str):
        pytest.skip(f"the {request.param} sandbox cannot run here: {found}")
    return found


@pytest.fixture
def bwrap() -> Sandbox:
    found = bubblewrap()
    if isinstance(found, str):
        pytest.skip(f"bubblewrap cannot run here ({found}); `make install` installs it")
    return found


def run(code: str, box: Sandbox, **overrides: float) -> str:
    return run_python(code, msgspec.structs.replace(SETTINGS, **overrides), box=box)


def live_children() -> list[int]:
    """Processes whose parent is this one and which have not exited."""
    return [pid for pid, ppid, state in processes() if ppid == os.getpid() and state != "Z"]


def processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, state) of every process."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            found.append((int(entry), int(ppid), state))
    return found


def test_prints_and_stdlib_imports_work(box: Sandbox) -> None:
    assert run("print(6 * 7)", box) == "42"
    assert run("import statistics, json\nprint(json.dumps(statistics.mean([1, 2, 6])))", box) == "3"
    assert run("", box) == "(no output)"


def test_errors_and_exit_status_are_reported(box: Sandbox) -> None:
    output = run("print('before')\n1 / 0", box)
    assert output.startswith('before\nTraceback (most recent call last):\n  File "main.py", line 2')
    assert output.endswith("ZeroDivisionError: division by zero\n[exit status 1]")
    assert run("raise SystemExit(3)", box) == "[exit status 3]"


def test_environment_is_empty_and_the_directory_is_fresh(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    output = run("import os\nprint(sorted(os.environ))\nprint(sorted(os.listdir('.')))", box)
    assert output == "['HOME', 'TMPDIR']\n['main.py']"
    # What one call writes, the next does not see.
    assert run("open('a.txt', 'w').write('hi')\nprint(open('a.txt').read())", box) == "hi"
    assert run("import os\nprint(sorted(os.listdir('.')))", box) == "['main.py']"


def test_files_work_inside_the_working_directory(box: Sandbox) -> None:
    code = "import os, tempfile\nprint(tempfile.mkdtemp().startswith(os.getcwd() + '/'))"
    assert run(code, box) == "True"


@pytest.mark.parametrize(
    "code",
    [
        "print(open('/etc/passwd').read())",
        "print(open('{secret}').read())",
        "print(open('../../../../../../{secret}').read())",
        "import os\nprint(os.listdir('/'))",
        "import pathlib\nprint(pathlib.Path('{secret}').read_text())",
        "import os\nfd = os.open('{secret}', os.O_RDONLY)\nprint(os.read(fd, 100))",
        "print(open('/proc/{batch}/environ').read())",
    ],
)
def test_plain_reads_outside_its_directory_fail(box: Sandbox, code: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    output = run(code.format(secret=secret, batch=os.getpid()), box)
    assert "PermissionError: sandbox:" in output
    assert "TOP-SECRET" not in output and "root:" not in output
    assert output.endswith("[exit status 1]")


def test_cannot_write_outside_its_directory_even_under_the_stdlib(box: Sandbox, tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    output = run(f"open('{target}', 'w').write('x')", box)
    assert "PermissionError: sandbox:" in output and not target.exists()
    output = run("import json, os\nopen(os.path.join(os.path.dirname(json.__file__), 'x.py'), 'w')", box)
    assert "is read-only" in output


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.fork()",
        "import subprocess\nsubprocess.run(['ls'])",
        "import os\nos.system('ls')",
        "import ctypes",
        "import os\nos.kill(os.getppid(), 9)",
        "import gc\ngc.get_objects()",
        "import os\nos.symlink('/etc/passwd', 'link')",
        "import json, os\nos.open(os.path.dirname(json.__file__), os.O_RDONLY)",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
    ],
)
def test_escape_hatches_are_refused(box: Sandbox, code: str) -> None:
    output = run(code, box)
    assert "PermissionError: sandbox:" in output
    assert output.endswith("[exit status 1]")


def test_cannot_open_a_socket(box: Sandbox) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        output = run(code, box)
        assert "connected" not in output and "PermissionError: sandbox: socket." in output
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_memory_limit_fails_cleanly(box: Sandbox) -> None:
    output = run("x = bytearray(1 << 30)\nprint('allocated')", box, python_memory_mb=128)
    assert "allocated" not in output
    assert "MemoryError" in output and output.endswith("[exit status 1]")


def test_infinite_loop_is_killed_at_the_cpu_limit(box: Sandbox) -> None:
    start = time.monotonic()
    assert run("while True:\n    pass", box) == "[killed: CPU time limit of 1 s exceeded]"
    assert time.monotonic() - start < 4.0


def test_sleeping_code_is_killed_at_the_wall_limit(box: Sandbox) -> None:
    before = set(live_children())  # the chat template's worker, say
    start = time.monotonic()
    assert run("import time\nprint('start')\ntime.sleep(60)", box, python_wall_s=0.5) == (
        "start\n[killed: wall time limit of 0.5 s exceeded]"
    )
    assert time.monotonic() - start < 3.0
    time.sleep(0.2)
    assert set(live_children()) <= before


def test_output_flood_is_truncated(box: Sandbox) -> None:
    output = run("print('x' * 3_000_000)", box)
    assert output == "x" * 1000 + "\n[output truncated: showing the first 1,000 characters of 3,000,001 bytes]"
    endless = run("while True:\n    print('y' * 1000)", box)
    assert endless.startswith("y" * 1000 + "\n[output truncated")
    assert endless.endswith("[killed: CPU time limit of 1 s exceeded]")


# The attacks that walked around the audit hook: under bubblewrap there is nothing to walk to.


@pytest.mark.parametrize(
    "target",
    ["/etc/passwd", "/proc/{batch}/environ", "/proc/{batch}/root/etc/passwd", "{repo}/README.md", "{secret}"],
)
def test_with_the_hook_defeated_no_file_outside_is_there(
    bwrap: Sandbox, target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    (tmp_path / "secret.txt").write_text(CANARY)
    path = target.format(batch=os.getpid(), repo=REPO, secret=tmp_path / "secret.txt")
    output = run(HOOK_BYPASS + f"print(open({path!r}, errors='replace').read())", bwrap)
    assert "FileNotFoundError" in output and CANARY not in output and "root:" not in output
    # Every environment the sandbox can see: its own processes' only, none holding more than bwrap's PWD.
    code = HOOK_BYPASS + "for pid in os.listdir('/proc'):\n    if pid.isdigit():\n"
    code += "        print(pid, open(f'/proc/{pid}/environ', 'rb').read())"
    assert run(code, bwrap) == "1 b''\n2 b'PWD=/sandbox\\x00'"


def test_with_the_hook_defeated_nothing_outside_can_be_written(bwrap: Sandbox, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    for target in (tmp_path / "escaped.txt", REPO / "escaped.txt", Path("/tmp/k2batch-escaped.txt")):
        output = run(HOOK_BYPASS + f"open({str(target)!r}, 'w').write('x')\nprint('wrote')", bwrap)
        assert "wrote" not in output and not target.exists(), output
    # Writable: its own working directory, a tmpfs of MAX_WORK_BYTES.
    code = "n = 0\ntry:\n    while True:\n        open(f'f{n}', 'wb').write(bytes(1 << 20))\n        n += 1\n"
    code += "except OSError as error:\n    print(n, error.strerror)"
    assert run(code, bwrap, python_wall_s=10.0) == f"{python_sandbox.MAX_WORK_BYTES >> 20} No space left on device"


def test_cannot_signal_or_renice_the_batch_or_any_other_process(bwrap: Sandbox) -> None:
    victim = subprocess.Popen(["sleep", "60"])
    try:
        for pid in (victim.pid, os.getpid()):
            code = (
                f"import os, signal\ntry:\n    signal.pidfd_send_signal(os.pidfd_open({pid}), signal.SIGKILL)\n"
                f"except OSError as error:\n    print('signal', error.strerror)\ntry:\n"
                f"    os.setpriority(os.PRIO_PROCESS, {pid}, 19)\nexcept OSError as error:\n"
                "    print('renice', error.strerror)"
            )
            assert run(code, bwrap) == "signal No such process\nrenice No such process"
        time.sleep(0.1)
        assert victim.poll() is None and os.getpriority(os.PRIO_PROCESS, victim.pid) == 0
    finally:
        victim.kill()
        victim.wait()
    # Its parent is the namespace's init: killing it ends the sandbox, nothing else.
    code = "import os, signal\nprint(os.getppid(), flush=True)\nsignal.pidfd_send_signal(os.pidfd_open(1), 9)"
    assert run(code, bwrap).startswith("1")


def test_sees_only_its_own_processes_as_an_unprivileged_uid(bwrap: Sandbox) -> None:
    code = HOOK_BYPASS + "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), os.getuid())\n"
    code += "print([line.split()[1] for line in open('/proc/self/status') if line.startswith(('CapEff', 'CapBnd'))])"
    assert run(code, bwrap) == f"[1, 2] {SANDBOX_UID}\n['0000000000000000', '0000000000000000']"


def test_cannot_make_fifos_outside_or_device_nodes(bwrap: Sandbox, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    fifo = tmp_path / "x.parquet"
    code = f"import os, stat\ntry:\n    os.mkfifo({str(fifo)!r})\nexcept OSError as error:\n    print(error.strerror)\n"
    code += "try:\n    os.mknod('kmsg', stat.S_IFCHR | 0o600, os.makedev(1, 11))\n"
    code += "except OSError as error:\n    print(error.strerror)"
    assert run(code, bwrap) == "No such file or directory\nOperation not permitted"
    assert not fifo.exists()


def test_has_its_own_empty_network_namespace(bwrap: Sandbox) -> None:
    code = HOOK_BYPASS + "print(os.readlink('/proc/self/ns/net'))\n"
    code += "print([line.split(':')[0].strip() for line in open('/proc/self/net/dev').readlines()[2:]])"
    inside, interfaces = run(code, bwrap).splitlines()
    assert inside.startswith("net:[") and inside != os.readlink("/proc/self/ns/net")
    assert interfaces == "['lo']"


def test_the_sandbox_dies_with_the_batch(bwrap: Sandbox) -> None:
    # A batch process starts a call that sleeps, then dies without cleaning up: nothing it started survives.
    batch_code = (
        "import os, sys, threading, time\nfrom k2batch.agent.tools.python_sandbox import run_python\n"
        "from k2batch.agent.tools import ToolSettings\n"
        "threading.Thread(target=run_python, args=('import time; time.sleep(60)', ToolSettings(python_wall_s=60)),"
        " daemon=True).start()\ntime.sleep(1.0)\n"
        f"sys.path.insert(0, {str(REPO)!r})\nfrom tests.agent.test_tools_python import processes\n"
        "tree, grown = {os.getpid()}, True\nwhile grown:\n"
        "    new = {pid for pid, ppid, _ in processes() if ppid in tree} - tree\n"
        "    tree |= new\n    grown = bool(new)\n"
        "print(' '.join(map(str, tree - {os.getpid()})), flush=True)\nos._exit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", batch_code], capture_output=True, text=True, timeout=60, cwd=REPO)
    started = [int(pid) for pid in done.stdout.split()]
    assert len(started) >= 3, done.stderr  # bwrap, the namespace's init, the interpreter
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(pid in started and state != "Z" for pid, _, state in processes()):
        time.sleep(0.1)
    assert not [pid for pid, _, state in processes() if pid in started and state != "Z"]


# The weaker sandbox: what it keeps when the batch runs as root.


def test_the_weaker_sandbox_run_by_root_keeps_the_batch_out_of_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("run by another user, the weaker sandbox keeps that user's uid: only the audit hook holds")
    weaker = the_weaker_sandbox()
    if isinstance(weaker, str):
        pytest.skip(f"the weaker sandbox cannot run here: {weaker}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    victim = subprocess.Popen(["sleep", "60"])
    try:
        code = HOOK_BYPASS + (
            f"print(os.getuid())\nfor pid in ({victim.pid}, {os.getpid()}):\n    try:\n"
            "        signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL)\n"
            "    except OSError as error:\n        print(error.strerror)\n"
            f"try:\n    open('/proc/{os.getpid()}/environ').read()\nexcept OSError as error:\n    print(error.strerror)"
        )
        output = run("import signal\n" + code, weaker)
        assert output == f"{SANDBOX_UID}\nOperation not permitted\nOperation not permitted\nPermission denied"
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


# Without bubblewrap, no python tool unless the config accepts the weaker sandbox.


def test_a_missing_bubblewrap_is_named() -> None:
    assert bubblewrap("k2batch-no-such-bwrap") == (
        "k2batch-no-such-bwrap is not installed (Debian: apt-get install bubblewrap; `make install` does it)"
    )


def test_without_bubblewrap_the_tool_refuses_unless_the_weaker_sandbox_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    weaker = the_weaker_sandbox()
    if isinstance(weaker, str):
        pytest.skip(f"the weaker sandbox cannot run here: {weaker}")
    monkeypatch.setattr(python_sandbox, "sandbox", lambda: weaker)
    ctx = ToolContext.for_job("job-1", "draft", SETTINGS)
    result = TOOLS.call("python", json.dumps({"code": "print(1 + 1)"}), ctx, 10.0, 1000)
    assert result.error_type == "tool_error"
    assert "SandboxUnavailable: the python tool needs bubblewrap" in result.content
    assert "tools.python.allow_weaker_sandbox = true" in result.content
    accepting = msgspec.structs.replace(SETTINGS, python_allow_weaker_sandbox=True)
    ctx = ToolContext.for_job("job-1", "draft", accepting)
    result = TOOLS.call("python", json.dumps({"code": "print(1 + 1)"}), ctx, 10.0, 1000)
    assert (result.content, result.error_type) == ("2", None)
    # Even accepted, a weaker sandbox that cannot start says why.
    broken = msgspec.structs.replace(weaker, unusable="/x/python cannot run as uid 65534")
    monkeypatch.setattr(python_sandbox, "sandbox", lambda: broken)
    with pytest.raises(SandboxUnavailable, match="cannot run here: bubblewrap left out .* /x/python cannot run"):
        run_python("print(1)", accepting)


def test_a_batch_with_the_python_tool_refuses_to_start_without_bubblewrap(
    k2_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.agent.test_batch import answering_engine, config_for

    weaker = Sandbox(kind="kernel", problem="bwrap is not installed (testing)")
    monkeypatch.setattr(python_sandbox, "sandbox", lambda: weaker)
    inputs, output = tmp_path / "inputs", str(tmp_path / "out")
    inputs.mkdir()
    config, engine = config_for(k2_checkpoint), answering_engine(k2_checkpoint)
    pq.write_table(pa.table({"job_id": ["a"], "prompt": ["2+3?"], "tools": [["python"]]}), inputs / "jobs.parquet")
    with pytest.raises(SandboxUnavailable, match="bwrap is not installed"):
        batch.run_batch(str(inputs), output, config, engine=engine)
    assert not (tmp_path / "out" / "results").exists()
    # Jobs without the python tool run as ever.
    pq.write_table(pa.table({"job_id": ["a"], "prompt": ["2+3?"], "tools": [["calculator"]]}), inputs / "jobs.parquet")
    assert batch.run_batch(str(inputs), output, config, engine=engine)["rows_by_status"] == {"ok": 1}


def test_a_batch_keeps_the_runners_secret_out_of_its_traces(
    bwrap: Sandbox, k2_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The red team's path: a model-written call reads the runner's environment around the hook; the result
    # would land in the trace. Here the first step of every episode is that call.
    import polars as pl

    from tests.agent.conftest import engine_for, script_steps
    from tests.agent.test_batch import config_for
    from tests.agent.test_episode import ANSWER

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    code = HOOK_BYPASS + f"for p in ('{os.getpid()}', 'self', '1', '2'):\n    try:\n"
    code += "        print(p, open(f'/proc/{p}/environ').read())\n    except OSError as error:\n"
    code += "        print(p, error.strerror)"
    arguments = json.dumps({"code": code})
    call = (
        "<think>read it</think><|tool_calls_section_begin|><|tool_call_begin|>functions.python:0"
        f"<|tool_call_argument_begin|>{arguments}<|tool_call_end|><|tool_calls_section_end|><|im_end|>"
    )
    engine = engine_for(k2_checkpoint)
    script_steps(engine, {":0": engine.tokenizer.encode_chat(call), ":1": engine.tokenizer.encode_chat(ANSWER)})
    config = config_for(k2_checkpoint, max_new_tokens=600)
    agent = msgspec.structs.replace(config.agent, max_new_tokens_per_episode=800)
    config = msgspec.structs.replace(config, agent=agent)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(pa.table({"job_id": ["a"], "prompt": ["2+3?"], "tools": [["python"]]}), inputs / "jobs.parquet")
    batch.run_batch(str(inputs), str(tmp_path / "out"), config, engine=engine)
    traces = pl.read_parquet(f"{tmp_path}/out/traces/**/*.parquet")
    (result,) = traces.filter(pl.col("tool_name") == "python")["tool_result"].to_list()
    assert result.startswith(f"{os.getpid()} No such file or directory\nself PWD=/sandbox")
    results = pl.read_parquet(f"{tmp_path}/out/results/**/*.parquet")
    assert CANARY not in str(traces.to_dicts()) + str(results.to_dicts())


def test_registry_timeout_kills_the_subprocess(bwrap: Sandbox) -> None:
    ctx = ToolContext.for_job("job-1", "draft", SETTINGS)
    before = set(live_children())
    result = TOOLS.call("python", json.dumps({"code": "import time\ntime.sleep(60)"}), ctx, 0.5, 1000)
    # The registry and the sandbox stop at the same deadline; either may report first.
    assert result.error_type == "timeout" or result.content == "[killed: the tool call's time limit was reached]"
    time.sleep(0.5)  # the tool thread kills and reaps its child at the same deadline
    assert set(live_children()) <= before


def test_through_the_registry(bwrap: Sandbox) -> None:
    ctx = ToolContext.for_job("job-1", "draft", SETTINGS)
    result = TOOLS.call("python", json.dumps({"code": "print(sum(range(10)))"}), ctx, 10.0, 1000)
    assert (result.content, result.error_type) == ("45", None)


# Everything above again, as an unprivileged user.


def _unreachable_ancestor(path: str) -> str | None:
    """The outermost folder above `path` that other users cannot enter, if any."""
    parts = Path(path).parts
    for depth in range(2, len(parts)):
        folder = Path(*parts[:depth])
        if not folder.stat().st_mode & 0o001:
            return str(folder)
    return None


@pytest.mark.slow
def test_the_sandbox_tests_pass_as_a_plain_user() -> None:
    if os.geteuid() != 0:
        pytest.skip("already a plain user: the tests above ran as one")
    if not (shutil.which("runuser") and shutil.which("unshare") and shutil.which("useradd")):
        pytest.skip("needs runuser, unshare and useradd (util-linux, passwd) to run the tests as a plain user")
    user = "k2batch-sandbox-test"
    if subprocess.run(["id", user], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True)
    # In a mount namespace of its own: a folder the user cannot enter on the way to the interpreter (a pyenv under
    # /root, say) is covered with an empty one, and the interpreter's prefix is put back in it.
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    covered = _unreachable_ancestor(prefix)
    setup = ""
    if covered:
        setup = (
            f'keep=$(mktemp -d); mount --bind {prefix} "$keep"; mount -t tmpfs -o mode=0755,size=1m k2batch {covered}; '
            f'mkdir -p {prefix}; mount --bind "$keep" {prefix}; '
        )
    pytest_args = f"{sys.executable} -m pytest -q -rs -p no:cacheprovider {__file__} -k 'not plain_user'"
    script = (
        f"set -e; {setup}exec runuser -u {user} -- env -i HOME=/tmp PATH=/usr/bin:/bin "
        f"PYTHONDONTWRITEBYTECODE=1 {pytest_args}"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    # Both sandboxes ran; the one test skipped is the one about the weaker sandbox run by root.
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) <= 1 and all("run by another user" in line for line in skips), skips
    assert " passed" in done.stdout and " failed" not in done.stdout
