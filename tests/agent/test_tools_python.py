"""The python tool's sandbox: output, limits, no files outside its directory, no network."""

import json
import os
import socket
import time
from pathlib import Path

import msgspec
import pytest

from k2batch.agent.tools import TOOLS, ToolContext, ToolSettings
from k2batch.agent.tools.python_sandbox import network_isolation, run_python

SETTINGS = ToolSettings(python_wall_s=5.0, python_cpu_s=1.0, python_memory_mb=256, python_output_chars=1000)


def run(code: str, **overrides: float) -> str:
    return run_python(code, msgspec.structs.replace(SETTINGS, **overrides))


def live_children() -> list[int]:
    """Processes whose parent is this one and which have not exited."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == os.getpid() and state != "Z":
                children.append(int(entry))
    return children


def test_prints_and_stdlib_imports_work() -> None:
    assert run("print(6 * 7)") == "42"
    assert run("import statistics, json\nprint(json.dumps(statistics.mean([1, 2, 6])))") == "3"
    assert run("") == "(no output)"


def test_errors_and_exit_status_are_reported() -> None:
    output = run("print('before')\n1 / 0")
    assert output.startswith('before\nTraceback (most recent call last):\n  File "main.py", line 2')
    assert output.endswith("ZeroDivisionError: division by zero\n[exit status 1]")
    assert run("raise SystemExit(3)") == "[exit status 3]"


def test_environment_is_empty_and_the_directory_is_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K2BATCH_CANARY", "inherited")
    output = run("import os\nprint(sorted(os.environ))\nprint(sorted(os.listdir('.')))")
    # HOME and TMPDIR point into the working directory; LC_CTYPE is Python's own UTF-8 coercion.
    assert output in ("['HOME', 'TMPDIR']\n['main.py']", "['HOME', 'LC_CTYPE', 'TMPDIR']\n['main.py']")


def test_files_work_inside_the_working_directory_and_it_is_removed_afterwards() -> None:
    code = """
import os, tempfile
open("a.txt", "w").write("hi")
print(open("a.txt").read(), tempfile.mkdtemp().startswith(os.getcwd()), os.getcwd())
"""
    text, tempdir_inside, workdir = run(code).split()
    assert (text, tempdir_inside) == ("hi", "True")
    assert not os.path.exists(workdir)


@pytest.mark.parametrize(
    "code",
    [
        "print(open('/etc/passwd').read())",
        "print(open('{secret}').read())",
        "print(open('../../../../../../{secret}').read())",
        "import os\nprint(os.listdir('/'))",
        "import pathlib\nprint(pathlib.Path('{secret}').read_text())",
        "import os\nfd = os.open('{secret}', os.O_RDONLY)\nprint(os.read(fd, 100))",
    ],
)
def test_cannot_read_outside_its_directory(code: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    output = run(code.format(secret=secret))
    assert "PermissionError: sandbox:" in output
    assert "TOP-SECRET" not in output and "root:" not in output
    assert output.endswith("[exit status 1]")


def test_cannot_write_outside_its_directory_even_under_the_stdlib(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    output = run(f"open('{target}', 'w').write('x')")
    assert "PermissionError: sandbox:" in output and not target.exists()
    output = run("import json, os\nopen(os.path.join(os.path.dirname(json.__file__), 'x.py'), 'w')")
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
def test_escape_hatches_are_refused(code: str) -> None:
    output = run(code)
    assert "PermissionError: sandbox:" in output
    assert output.endswith("[exit status 1]")


def test_cannot_open_a_socket() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        output = run(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        )
        assert "connected" not in output and "PermissionError: sandbox: socket." in output
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_child_has_its_own_network_namespace_where_the_kernel_allows() -> None:
    if not network_isolation():
        pytest.skip(
            "this kernel or container refuses network namespaces; the audit hook alone refuses sockets"
        )
    inside = run("import os\nprint(os.readlink('/proc/self/ns/net'))")
    assert inside.startswith("net:[") and inside != os.readlink("/proc/self/ns/net")


def test_memory_limit_fails_cleanly() -> None:
    output = run("x = bytearray(1 << 30)\nprint('allocated')", python_memory_mb=128)
    assert "allocated" not in output
    assert "MemoryError" in output and output.endswith("[exit status 1]")


def test_infinite_loop_is_killed_at_the_cpu_limit() -> None:
    start = time.monotonic()
    assert run("while True:\n    pass") == "[killed: CPU time limit of 1 s exceeded]"
    assert time.monotonic() - start < 4.0


def test_sleeping_code_is_killed_at_the_wall_limit() -> None:
    start = time.monotonic()
    assert run("import time\nprint('start')\ntime.sleep(60)", python_wall_s=0.5) == (
        "start\n[killed: wall time limit of 0.5 s exceeded]"
    )
    assert time.monotonic() - start < 3.0


def test_output_flood_is_truncated() -> None:
    output = run("print('x' * 3_000_000)")
    assert (
        output == "x" * 1000 + "\n[output truncated: showing the first 1,000 characters of 3,000,001 bytes]"
    )
    endless = run("while True:\n    print('y' * 1000)")
    assert endless.startswith("y" * 1000 + "\n[output truncated")
    assert endless.endswith("[killed: CPU time limit of 1 s exceeded]")


def test_registry_timeout_kills_the_subprocess() -> None:
    ctx = ToolContext.for_job("job-1", "draft", SETTINGS)
    before = set(live_children())
    result = TOOLS.call("python", json.dumps({"code": "import time\ntime.sleep(60)"}), ctx, 0.5, 1000)
    # The registry and the sandbox stop at the same deadline; either may report first.
    assert (
        result.error_type == "timeout" or result.content == "[killed: the tool call's time limit was reached]"
    )
    time.sleep(0.5)  # the tool thread kills and reaps its child at the same deadline
    assert set(live_children()) <= before


def test_through_the_registry() -> None:
    ctx = ToolContext.for_job("job-1", "draft", SETTINGS)
    result = TOOLS.call("python", json.dumps({"code": "print(sum(range(10)))"}), ctx, 10.0, 1000)
    assert (result.content, result.error_type) == ("45", None)
