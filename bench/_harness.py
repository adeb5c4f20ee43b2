"""Shared pieces for the benchmarks: child processes, CPU accounting and a lean HTTP client.

The client is deliberately minimal (HTTP/1.1 keep-alive on raw trio sockets, request bytes
encoded once) so that, on a small machine, the load generator takes as little CPU as possible
away from the processes being measured.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import trio

CLK_TCK = os.sysconf("SC_CLK_TCK")
RECV_SIZE = 65536
MAX_HEAD = 64 * 1024
LOOPBACK = "127.0.0.1"


class BenchError(Exception):
    """A failure that ends the benchmark with a clear message and a non-zero exit."""


class ProtocolError(Exception):
    """The server sent something this client cannot parse."""


class ConnectionClosed(Exception):
    """The server closed the connection."""


# Everything a request on a keep-alive connection may fail with (then: reconnect).
REQUEST_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ProtocolError,
    ConnectionClosed,
)
PROBE_ERRORS: tuple[type[BaseException], ...] = (*REQUEST_ERRORS, trio.TooSlowError)
PROBE_TIMEOUT = 2.0


# ---------------------------------------------------------------- ports and CPU


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open while choosing, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read()
    # the command name is in parentheses and may contain spaces: split after the last ')'
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs together, from /proc/stat."""
    with open("/proc/stat", "rb") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


@dataclass(slots=True)
class CpuSnapshot:
    """CPU seconds of the watched processes (and the whole machine) at one moment."""

    per_pid: dict[int, float]
    machine: tuple[int, int]
    wall: float

    @classmethod
    def take(cls, pids: Sequence[int]) -> CpuSnapshot:
        return cls(
            {pid: cpu_seconds(pid) for pid in pids}, machine_busy_ticks(), time.perf_counter()
        )

    def delta(self, later: CpuSnapshot, pid: int) -> float:
        """CPU seconds ``pid`` used between this snapshot and ``later``."""
        return later.per_pid[pid] - self.per_pid[pid]

    def machine_busy(self, later: CpuSnapshot) -> float:
        """Fraction of all CPUs busy between this snapshot and ``later`` (0..1)."""
        busy = later.machine[0] - self.machine[0]
        total = later.machine[1] - self.machine[1]
        return busy / total if total > 0 else 0.0


# ---------------------------------------------------------------- child processes


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL if the benchmark process dies (Linux only)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass(slots=True)
class Child:
    """One started process, its name and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 15) -> str:
        """The last ``lines`` of the child's output (stdout and stderr together)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise ``BenchError`` (with the child's last output) if it has exited."""
        code = self.proc.poll()
        if code is not None:
            raise BenchError(
                f"{self.name} (pid {self.pid}) exited with code {code}; its last output:\n"
                + (self.tail() or "(nothing)")
            )


@dataclass(slots=True)
class Children:
    """Processes started by the benchmark; ``stop_all`` ends each of them by its PID."""

    tmpdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="trio-bench-")))
    running: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str]) -> Child:
        """Start ``argv`` with its output in a log file (pipes could fill up and block it)."""
        log_path = self.tmpdir / f"{name}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        child = Child(name, proc, log_path)
        self.running.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.running:
            child.check_alive()

    def stop(self, children: Sequence[Child], grace: float = 3.0) -> None:
        """SIGTERM each of ``children``, wait up to ``grace`` s, then SIGKILL what is left."""
        for child in children:
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                child.proc.wait()
            if child in self.running:
                self.running.remove(child)

    def stop_all(self) -> None:
        """Stop every child still running and remove the log directory."""
        try:
            self.stop(list(self.running))
        finally:
            for path in self.tmpdir.glob("*"):
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                self.tmpdir.rmdir()


# ---------------------------------------------------------------- HTTP client


def encode_request(
    method: str, port: int, path: str, body: bytes | None = None, *, json: bool = True
) -> bytes:
    """The complete bytes of one HTTP/1.1 keep-alive request, encoded once and reused."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {LOOPBACK}:{port}"]
    if body is not None:
        if json:
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def json_body(obj: object) -> bytes:
    return orjson.dumps(obj)


@dataclass(slots=True)
class StreamResult:
    """What one streamed (SSE) response delivered."""

    status: int
    events: int  # ``data:`` events, not counting ``data: [DONE]``
    first_event: float | None  # perf_counter() when the first data event was complete
    done: bool  # ``data: [DONE]`` was seen


class HttpConn:
    """One HTTP/1.1 keep-alive connection; reconnects lazily after a close or error."""

    __slots__ = ("_buf", "_stream", "host", "port")

    def __init__(self, port: int, host: str = LOOPBACK) -> None:
        self.host = host
        self.port = port
        self._stream: trio.SocketStream | None = None
        self._buf = bytearray()

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        self._buf.clear()
        if stream is not None:
            with contextlib.suppress(*REQUEST_ERRORS):
                await stream.aclose()

    async def _send(self, request: bytes) -> None:
        """Send ``request``, connecting first if needed."""
        if self._stream is None:
            self._stream = await trio.open_tcp_stream(self.host, self.port)
            self._buf.clear()
        await self._stream.send_all(request)

    async def _fill(self) -> None:
        assert self._stream is not None
        data = await self._stream.receive_some(RECV_SIZE)
        if not data:
            raise ConnectionClosed
        self._buf += data

    async def _head(self) -> tuple[int, int | None, bool, bool]:
        """Read the response head: (status, content-length, chunked, keep-alive)."""
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_HEAD:
                raise ProtocolError("response head too large")
            await self._fill()
        lines = bytes(buf[:end]).split(b"\r\n")
        del buf[: end + 4]
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        length: int | None = None
        chunked = False
        keep_alive = parts[0] != b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                value = value.strip().lower()
                keep_alive = value == b"keep-alive" or (keep_alive and value != b"close")
        return status, length, chunked, keep_alive

    async def _exact(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            await self._fill()
        data = bytes(buf[:n])
        del buf[:n]
        return data

    async def _line(self) -> bytes:
        buf = self._buf
        while (end := buf.find(b"\r\n")) < 0:
            if len(buf) > MAX_HEAD:
                raise ProtocolError("chunk-size line too long")
            await self._fill()
        line = bytes(buf[:end])
        del buf[: end + 2]
        return line

    async def _chunks(self, on_data: Callable[[bytes], None]) -> None:
        """Read a chunked body to its end, passing each chunk's data to ``on_data``."""
        while True:
            size_line = await self._line()
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                while await self._line():  # trailers, up to the empty line
                    pass
                return
            on_data(await self._exact(size))
            if await self._exact(2) != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")

    async def _body(self, length: int | None, chunked: bool, keep_alive: bool) -> bytes:
        if chunked:
            parts: list[bytes] = []
            await self._chunks(parts.append)
            body = b"".join(parts)
        elif length is not None:
            body = await self._exact(length)
        else:  # delimited by the close
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await self._fill()
            body, keep_alive = bytes(self._buf), False
        if not keep_alive:
            await self.aclose()
        return body

    async def request(self, request: bytes) -> tuple[int, bytes]:
        """Send pre-encoded ``request`` and return (status, body).

        A keep-alive connection the server closed while idle is retried once on a new one.
        """
        for attempt in (0, 1):
            reused = self._stream is not None
            try:
                await self._send(request)
                status, length, chunked, keep_alive = await self._head()
            except (ConnectionClosed, trio.BrokenResourceError, ConnectionResetError):
                nothing_received = not self._buf
                await self.aclose()
                if attempt == 0 and reused and nothing_received:
                    continue
                raise
            break
        return status, await self._body(length, chunked, keep_alive)

    async def stream(self, request: bytes) -> StreamResult:
        """Send a streaming ``request`` and read its SSE body, counting ``data:`` events."""
        await self._send(request)
        status, length, chunked, keep_alive = await self._head()
        if status != 200 or not chunked:
            await self._body(length, chunked, keep_alive)
            return StreamResult(status, 0, None, False)
        result = StreamResult(status, 0, None, False)
        pending = bytearray()

        def on_data(data: bytes) -> None:
            pending.extend(data)
            while (end := pending.find(b"\n\n")) >= 0:
                event = bytes(pending[:end])
                del pending[: end + 2]
                if not event.startswith(b"data:"):
                    continue  # comments, event:/id: lines without data
                if event[5:].strip() == b"[DONE]":
                    result.done = True
                    continue
                if result.first_event is None:
                    result.first_event = time.perf_counter()
                result.events += 1

        await self._chunks(on_data)
        if not keep_alive:
            await self.aclose()
        return result


async def get_json(port: int, path: str) -> tuple[int, object]:
    """One GET on a fresh connection (at most ``PROBE_TIMEOUT`` s): (status, JSON or None)."""
    conn = HttpConn(port)
    try:
        with trio.fail_after(PROBE_TIMEOUT):
            status, body = await conn.request(encode_request("GET", port, path))
    finally:
        await conn.aclose()
    try:
        return status, orjson.loads(body)
    except orjson.JSONDecodeError:
        return status, None


async def answers_health(port: int) -> bool:
    """Whether the server on ``port`` answers ``GET /health`` with 200."""
    status, _ = await get_json(port, "/health")
    return status == 200


async def router_sees(port: int, n_workers: int) -> bool:
    """Whether the router on ``port`` reports ``n_workers`` healthy workers."""
    status, body = await get_json(port, "/health")
    return status == 200 and isinstance(body, dict) and body.get("healthy_workers") == n_workers


async def wait_until(
    what: str,
    check: Callable[[], Awaitable[bool]],
    *,
    children: Children,
    within: float,
) -> None:
    """Poll ``check`` until it returns True; ``BenchError`` on timeout or if a child died."""
    deadline = trio.current_time() + within
    last_error = ""
    while True:
        children.check_alive()
        try:
            if await check():
                return
        except PROBE_ERRORS as exc:
            last_error = f" (last error: {type(exc).__name__}: {exc})"
        if trio.current_time() > deadline:
            raise BenchError(f"{what} not ready within {within:g} s{last_error}")
        await trio.sleep(0.1)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..100) of already sorted values (nan if empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


# ---------------------------------------------------------------- report helpers


def fmt(value: float, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals; nan shows as ``-``."""
    return "-" if value != value else f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain right-aligned text table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- entry points


def exception_leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (possibly nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from exception_leaves(inner)
    else:
        yield exc


def run_bench(
    name: str,
    run: Callable[..., Awaitable[int | None]],
    *args: object,
    children: Children,
    expected: tuple[type[BaseException], ...] = (BenchError,),
    timeout: float | None = None,
) -> int:
    """``trio.run(run, *args)``; expected failures become one line and exit 1.

    With ``timeout`` a run that takes longer fails as a ``BenchError``. Ctrl-C
    exits 130. Every child process is stopped, whatever happens.
    """

    async def bounded() -> int | None:
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                return await run(*args)
        except trio.TooSlowError:
            raise BenchError(f"the run did not finish within --timeout {timeout:g} s") from None

    try:
        result = trio.run(bounded)
    except BaseException as exc:
        leaves = list(exception_leaves(exc))
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            print(f"{name}: interrupted", file=sys.stderr)
            return 130
        if leaves and all(isinstance(e, expected) for e in leaves):
            for line in dict.fromkeys(f"{type(e).__name__}: {e}" for e in leaves):
                print(f"{name}: error: {line}", file=sys.stderr)
            return 1
        raise
    finally:
        children.stop_all()
    return result or 0


def print_figures(figures: Mapping[str, object], places: int) -> None:
    """The key figures as ``name=value`` lines, floats to ``places`` decimals."""
    for name, value in figures.items():
        print(f"{name}={value:.{places}f}" if isinstance(value, float) else f"{name}={value}")


def write_json(path: Path | None, figures: Mapping[str, object], args: object) -> None:
    """Write the figures and the settings that produced them (``--json PATH``)."""
    if path is None:
        return
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"figures": figures, "config": config}, indent=2, allow_nan=True) + "\n"
    )
