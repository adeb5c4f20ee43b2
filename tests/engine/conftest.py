"""The real-engine lane: the router in front of a real SGLang 0.5.23 process on the CPU.

``make test-sglang`` sets ``TRIO_ROUTER_SGLANG_TESTS=1`` and runs this directory; without it
(``make test``) every test here is skipped, with that reason in the summary.

One engine serves the whole run (``scripts/sglang/setup.sh`` builds it, cached outside the
repository): a session fixture starts it on a free port, waits for its ``/health`` within a
bound, and stops its whole process group at the end, even when a test fails. Starting one
costs ~40 s of CPU, so tests share it and are ordered to restart it as little as possible:
first those on the default model (``engine``), then the kill test (``killable_engine``,
which brings it back on the partial-UTF-8 model), then those on that model
(``partial_utf8_engine``), last those that change its weights (``disposable_engine``). Any
fixture restarts it first if it serves another model, was changed, or is down.

When the engine cannot be installed or started every test fails with one clear message
(CI's default), unless ``TRIO_ROUTER_SGLANG_OPTIONAL=1`` says to skip them. To iterate on
tests, ``TRIO_ROUTER_SGLANG_PORT=PORT`` uses an engine you started yourself
(``scripts/sglang/launch.sh PORT``); the tests that need to restart it then skip.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
import trio

from trio_router import RunningRouter
from trio_router.tokenizer import Tokenizer

from ..conftest import start_router

ENABLED = os.environ.get("TRIO_ROUTER_SGLANG_TESTS") == "1"
OPTIONAL = os.environ.get("TRIO_ROUTER_SGLANG_OPTIONAL") == "1"
EXTERNAL_PORT = os.environ.get("TRIO_ROUTER_SGLANG_PORT")
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "sglang"
SKIP_REASON = "real-SGLang lane: run it with `make test-sglang`"
SETUP_LIMIT = 25 * 60  # seconds for a first install (a few minutes on this machine)
READY_LIMIT = 300  # seconds for an engine to answer /health (~40 s idle, ~100 s busy)
TEST_LIMIT = 300  # seconds per test function (fixtures excluded: they bound themselves)
SETUP_EXITS = {3: "SGLang cannot be installed here", 4: "the test model cannot be built"}

HERE = Path(__file__).resolve().parent


#: the order engine tests run in, by the engine fixture they use (fewest restarts)
PHASES = {"engine": 0, "killable_engine": 1, "partial_utf8_engine": 2, "disposable_engine": 3}


def phase(item: pytest.Item) -> int:
    names = getattr(item, "fixturenames", ())
    return max((PHASES[name] for name in names if name in PHASES), default=0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if HERE in item.path.parents]
    for item in ours:
        if ENABLED:
            item.add_marker(pytest.mark.timeout(TEST_LIMIT, func_only=True))
        else:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
    if ENABLED:
        others = [item for item in items if HERE not in item.path.parents]
        items[:] = others + sorted(ours, key=phase)  # a stable sort: file order otherwise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A skipped lane test reports the directory as its place: one summary line per reason."""
    report = yield
    if report.skipped and HERE in item.path.parents and isinstance(report.longrepr, tuple):
        report.longrepr = (str(HERE), None, report.longrepr[2])
    return report


class EngineUnavailable(Exception):
    """SGLang could not be installed or started: the whole lane cannot run."""


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Engine:
    """One SGLang server process (``scripts/sglang/launch.sh``), stopped by its PID."""

    model: str  # scripts/sglang model variant: default or partial-utf8
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    changed: bool = False  # a test changed its state (weights, version)
    external: bool = False  # started by someone else: never started or stopped here

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.external or (self.process is not None and self.process.poll() is None)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(SCRIPTS / "launch.sh"), "--model", self.model, str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches the children
            )

    def wait_ready(self, limit: float = READY_LIMIT) -> None:
        """Until GET /health answers 200 (SGLang: 503 while starting)."""
        assert self.process is not None
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise EngineUnavailable(
                    f"SGLang engine {self.model} exited with {code} before it was ready; "
                    f"its log {self.log} ends with:\n{tail(self.log)}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=10).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise EngineUnavailable(
            f"SGLang engine {self.model} did not answer /health within {limit:g} s; "
            f"its log {self.log} ends with:\n{tail(self.log)}"
        )

    def kill(self) -> None:
        """SIGKILL the server process itself, as a crash would."""
        assert self.process is not None
        os.kill(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def restart(self, model: str | None = None) -> None:
        """Start again on the same port (serving ``model``), once the old one is gone."""
        if self.process is not None:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=30)
        self.model = model or self.model
        self.changed = False
        self.start()
        self.wait_ready()

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL what is left (children, a hung leader)."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group outlives its leader
            os.killpg(self.pid, sig)


def install(log: Path) -> None:
    """Build or reuse the engine's venv and models (scripts/sglang/setup.sh)."""
    try:
        with log.open("ab") as out:
            done = subprocess.run(
                [str(SCRIPTS / "setup.sh")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=SETUP_LIMIT,
                check=False,
            )
    except subprocess.TimeoutExpired:
        raise EngineUnavailable(f"scripts/sglang/setup.sh took over {SETUP_LIMIT} s") from None
    if done.returncode != 0:
        what = SETUP_EXITS.get(done.returncode, f"setup.sh failed with {done.returncode}")
        raise EngineUnavailable(f"{what}:\n{tail(log)}")


def unavailable(exc: EngineUnavailable) -> NoReturn:
    if OPTIONAL:
        pytest.skip(f"real SGLang unavailable: {exc}")
    pytest.fail(f"{exc}\n(TRIO_ROUTER_SGLANG_OPTIONAL=1 skips the lane instead)", pytrace=False)


@pytest.fixture(scope="session")
def sglang(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The run's engine process, started once and stopped at the end of the run."""
    logs = tmp_path_factory.mktemp("sglang-logs")
    if EXTERNAL_PORT:
        yield Engine("default", int(EXTERNAL_PORT), logs / "none.log", external=True)
        return
    engine = Engine("default", free_port(), logs / "engine.log")
    try:
        problem = None
        try:
            install(logs / "setup.log")
            engine.start()
            engine.wait_ready()
        except EngineUnavailable as exc:
            problem = exc
        if problem is not None:
            unavailable(problem)
        yield engine
    finally:
        engine.stop()


def serving(engine: Engine, model: str, *, pristine: bool = True) -> Engine:
    """``engine``, restarted first unless it is up, serves ``model`` and (``pristine``)
    no test changed it."""
    if engine.model != model or (pristine and engine.changed) or not engine.running:
        if engine.external:
            pytest.skip(f"needs the {model} engine, and TRIO_ROUTER_SGLANG_PORT's is not")
        problem = None
        try:
            engine.restart(model)
        except EngineUnavailable as exc:
            problem = exc
        if problem is not None:
            unavailable(problem)
    return engine


@pytest.fixture
def engine(sglang: Engine) -> Engine:
    """The engine on the default model, with its weights as built (version v0)."""
    return serving(sglang, "default")


@pytest.fixture
def partial_utf8_engine(sglang: Engine) -> Engine:
    """The engine on the model that may emit pieces of UTF-8 characters."""
    return serving(sglang, "partial-utf8")


@pytest.fixture
def killable_engine(sglang: Engine) -> Engine:
    """The engine, for a test that kills it (and restarts it, or the next fixture does)."""
    if sglang.external:
        pytest.skip("kills the engine, and TRIO_ROUTER_SGLANG_PORT's is not ours")
    return serving(sglang, sglang.model, pristine=False)


@pytest.fixture
def disposable_engine(sglang: Engine) -> Engine:
    """The engine, for a test that changes it (weights, version): restarted after."""
    if sglang.external:
        pytest.skip("changes the engine, and TRIO_ROUTER_SGLANG_PORT's is not ours")
    serving(sglang, sglang.model, pristine=False)
    sglang.changed = True
    return sglang


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=120) as c:  # a busy CPU engine can take a while
        yield c


async def start_engine_router(
    nursery: trio.Nursery, qwen3: Tokenizer, *engines: Engine, **overrides: Any
) -> RunningRouter:
    """A router in this process, on a real socket, in front of ``engines``.

    Token cache on. It probes ``/model_info``, at start only: SGLang's ``/health`` runs a
    generation and takes a second or more, which would slow every router start and share
    batches with the requests under test (the health test probes ``/health`` itself).
    """
    settings: dict[str, Any] = {
        "health_check_endpoint": "/model_info",
        "health_check_interval": 600.0,
        "health_check_timeout": 20.0,
        "radix_tree_max_size": 1_000_000,
        **overrides,
    }
    return await start_router(
        nursery, tokenizer=qwen3, worker_urls=tuple(e.url for e in engines), **settings
    )
