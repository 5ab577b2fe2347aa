"""A checkpoint's chat template rendered in a child process, within a time, memory and output budget.

Jinja's sandbox keeps a template from reaching Python objects, but not from looping for hours (nested
`range` loops) or asking for gigabytes (`'a' * 2**33`). A template comes with the checkpoint, from
whoever published it, so it renders here: one long-lived worker process per batch process, under an
address-space limit, killed and restarted when a render runs past its time. Requests and replies are
length-prefixed msgpack frames on the worker's stdin and stdout.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jinja2
import msgspec

TIMEOUT_S = 10.0
"""Wall time of one render; a correct template renders a long conversation in milliseconds."""
MEMORY_MB = 2048
"""Address space of the worker process (Python, jinja2 and the tokenizer modules take about 300 MiB)."""
MAX_CHARS = 32 << 20
"""Characters one render may produce: many times the longest context of any model this runs."""

_HEADER = struct.Struct("<I")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
# Runs as `python -I -S -c _MAIN parent_pid memory_bytes sys.path...`: the parent's import path, plus the
# directory holding k2batch (an editable install finds it through an import hook that -S leaves out).
_MAIN = """
import sys
sys.path[:] = sys.argv[3:]
from k2batch.tokenizer.template_worker import serve
serve(int(sys.argv[1]), int(sys.argv[2]))
"""


class TemplateBudgetError(jinja2.exceptions.TemplateError):
    """A chat template that ran past its time, memory or output budget."""


class _Request(msgspec.Struct, frozen=True):
    template: str
    context: dict[str, Any]
    max_chars: int


class _Reply(msgspec.Struct, frozen=True):
    text: str | None = None
    error: str | None = None
    """Name of the exception class the render raised."""
    message: str = ""
    lineno: int | None = None


def _read_frame(stream: Any) -> bytes | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    return stream.read(size)


def _render(request: _Request) -> str:
    from k2batch.tokenizer.chat import compile_template

    parts, size = [], 0
    for part in compile_template(request.template).generate(**request.context):
        size += len(part)
        if size > request.max_chars:
            raise TemplateBudgetError(f"the chat template wrote more than {request.max_chars:,} characters")
        parts.append(part)
    return "".join(parts)


def serve(parent: int, memory_bytes: int) -> None:
    """The worker's loop: render each request read from stdin, write the reply to stdout; exit with the parent."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (frame := _read_frame(stdin)) is not None:
        try:
            reply = _Reply(text=_render(msgspec.msgpack.decode(frame, type=_Request)))
        except MemoryError:
            reply = _Reply(error="TemplateBudgetError", message="the chat template ran out of memory")
        except jinja2.exceptions.TemplateSyntaxError as error:
            reply = _Reply(error=type(error).__name__, message=error.message or "", lineno=error.lineno)
        except jinja2.exceptions.TemplateError as error:
            reply = _Reply(error=type(error).__name__, message=str(error))
        except Exception as error:  # anything a template can raise (a TypeError of a filter, ...) goes back as text
            reply = _Reply(error="TemplateError", message=f"{type(error).__name__}: {error}")
        data = msgspec.msgpack.encode(reply)
        stdout.write(_HEADER.pack(len(data)) + data)
        stdout.flush()


def _error(reply: _Reply) -> jinja2.exceptions.TemplateError:
    if reply.error == "TemplateSyntaxError":
        return jinja2.exceptions.TemplateSyntaxError(reply.message, reply.lineno or 0)
    if reply.error == "TemplateBudgetError":
        return TemplateBudgetError(reply.message)
    kind = getattr(jinja2.exceptions, reply.error or "", None)
    if isinstance(kind, type) and issubclass(kind, jinja2.exceptions.TemplateError):
        return kind(reply.message)
    return jinja2.exceptions.TemplateError(reply.message)


class TemplateWorker:
    """The worker process of this process (started on first use, again after a fork or a kill)."""

    def __init__(self, timeout_s: float = TIMEOUT_S, memory_mb: int = MEMORY_MB, max_chars: int = MAX_CHARS) -> None:
        self.timeout_s, self.memory_mb, self.max_chars = timeout_s, memory_mb, max_chars
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = 0

    def render(self, template: str, context: dict[str, Any]) -> str:
        data = msgspec.msgpack.encode(_Request(template, context, self.max_chars))
        with self._lock:
            proc = self._running()
            assert proc.stdin is not None
            try:
                proc.stdin.write(_HEADER.pack(len(data)) + data)
                proc.stdin.flush()
            except BrokenPipeError as error:
                self._stop()
                raise TemplateBudgetError(
                    "the chat template's worker process died; it restarts on the next render"
                ) from error
            frame = self._read_reply(proc)
        reply = msgspec.msgpack.decode(frame, type=_Reply)
        if reply.error is not None:
            raise _error(reply)
        assert reply.text is not None
        return reply.text

    def _read_reply(self, proc: subprocess.Popen[bytes]) -> bytes:
        """The reply frame, read within the time budget; past it, the worker is killed."""
        assert proc.stdout is not None
        fd, buffer, end = proc.stdout.fileno(), bytearray(), time.monotonic() + self.timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while len(buffer) < _HEADER.size or len(buffer) < _HEADER.size + _HEADER.unpack_from(buffer)[0]:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    self._stop()
                    raise TemplateBudgetError(f"the chat template did not finish within {self.timeout_s:g} s")
                if not selector.select(remaining):
                    continue
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    self._stop()
                    raise TemplateBudgetError("the chat template's worker process died while rendering")
                buffer += chunk
        return bytes(buffer[_HEADER.size :])

    def _running(self) -> subprocess.Popen[bytes]:
        if self._owner != os.getpid():
            self._proc = None  # a forked child: the worker and its pipes are the parent's; it starts its own
        if self._proc is not None and self._proc.poll() is not None:
            self._stop()
        if self._proc is None:
            paths = [*sys.path, _PACKAGE_ROOT]
            memory = str(self.memory_mb << 20)
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _MAIN, str(os.getpid()), memory, *paths],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={name: os.environ[name] for name in ("TZ",) if name in os.environ},  # strftime_now's zone only
                start_new_session=True,  # a Ctrl-C in the terminal is for the batch, which stops the worker
            )
            self._owner = os.getpid()
        return self._proc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):  # a pipe to a dead process may fail to flush
                    stream.close()


WORKER = TemplateWorker()
