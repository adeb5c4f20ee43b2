"""Start-up: the open-file limit and the connections it allows; options that make no sense.

The file-limit tests run the router in a child process whose limit is lowered first
(``resource.setrlimit``), so exhausting it takes a few hundred sockets, not thousands.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from trio_router.cli import main

from .conftest import start_router, start_worker
from .test_cli import read_line_with
from .test_proxy import wait_until

#: a child that lowers its open-file limit (soft, hard) and runs the command line
CHILD = (
    "import resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))\n"
    "from trio_router.cli import main\n"
    "sys.exit(main(sys.argv[3:]))\n"
)


@asynccontextmanager
async def router_process(soft: int, hard: int) -> AsyncIterator[tuple[trio.Process, str]]:
    """A router in a child process with open-file limits (soft, hard); its URL."""
    command = [sys.executable, "-c", CHILD, str(soft), str(hard), "serve", "--port", "0"]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process,
                [*command, "--log-level", "info"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
            )
        )
        try:
            with trio.fail_after(30):
                url = (await read_line_with(process.stdout, b"listening on ")).decode()
            yield process, url
        finally:
            process.kill()


async def stderr_of(process: trio.Process) -> str:
    await process.wait()
    data = b""
    while chunk := await process.stderr.receive_some():
        data += chunk
    return data.decode(errors="replace")


def open_files_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/PID/limits")
async def test_the_soft_open_file_limit_is_raised_to_the_hard_limit():
    async with router_process(64, 512) as (process, _):
        assert open_files_limit(process.pid) == 512


async def test_idle_sockets_beyond_the_file_limit_do_not_lock_out_health_checks():
    sockets: list[trio.SocketStream] = []
    async with router_process(256, 256) as (process, url):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        try:
            with trio.fail_after(30):
                for _ in range(300):  # more than the router has descriptors
                    sockets.append(await trio.open_tcp_stream(host, int(port)))
                async with httpx.AsyncClient(timeout=10) as client:
                    for _ in range(3):
                        assert (await client.get(url + "/health")).status_code == 200
        finally:
            for stream in sockets:
                await trio.aclose_forcefully(stream)
        process.kill()
        log = await stderr_of(process)
    assert log.count("Too many open files") + log.count("EMFILE") <= 1
    assert "Traceback" not in log


def test_a_worker_url_with_port_0_stops_the_router_with_exit_2(capsys):
    assert main(["serve", "--port", "0", "--worker-urls", "http://127.0.0.1:0"]) == 2
    assert "port 0 is not a port to connect to" in capsys.readouterr().err


async def test_a_worker_url_with_port_0_is_refused_at_add_worker(nursery, client):
    running = await start_router(nursery)
    with trio.fail_after(10):
        response = await client.post(running.url + "/add_worker?url=http://127.0.0.1:0")
    assert response.status_code == 400
    assert len(running.router.pool) == 0


def test_a_prometheus_port_equal_to_the_router_port_is_refused_with_exit_2(capsys):
    assert main(["serve", "--port", "30123", "--prometheus-port", "30123"]) == 2
    assert "prometheus_port must differ from port" in capsys.readouterr().err


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process (here: a plain socket) listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "ExceptionGroup" not in err
    lines = [line for line in err.splitlines() if line.startswith("trio-router: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_port_in_use_stops_the_router_with_one_line_and_exit_2(taken_port, capsys):
    assert main(["serve", "--port", str(taken_port)]) == 2
    assert one_error_line(capsys) == (
        f"trio-router: error: cannot listen on 127.0.0.1:{taken_port} (--port): Address "
        "already in use (another process has it: choose another --port)"
    )


def test_a_prometheus_port_in_use_stops_the_router_with_one_line_and_exit_2(taken_port, capsys):
    assert main(["serve", "--port", "0", "--prometheus-port", str(taken_port)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"trio-router: error: cannot listen on 127.0.0.1:{taken_port} ")
    assert "(--prometheus-port): Address already in use" in line


def test_a_host_that_is_not_this_machines_stops_the_router_with_exit_2(capsys):
    assert main(["serve", "--host", "192.0.2.1", "--port", "0"]) == 2  # TEST-NET-1
    assert one_error_line(capsys) == (
        "trio-router: error: cannot listen on 192.0.2.1:0 (--port): Cannot assign requested address"
    )


def test_a_port_in_use_stops_the_simulated_worker_with_one_line_and_exit_2(taken_port):
    # in a child process: the simulated worker's hypercorn config leaks the socket it
    # could not bind, which this test run would report as an unraisable warning
    command = [sys.executable, "-m", "trio_router", "worker", "--port", str(taken_port)]
    done = subprocess.run(
        [*command, "--tokenizer", "bytes"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"trio-router: error: cannot listen on 127.0.0.1:{taken_port} (--port): Address "
        "already in use (another process has it: choose another --port)"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_router_started_with_its_worker_serves_as_soon_as_the_worker_is_up(nursery, client):
    # the README tour: router and worker started together; the worker is not up at the
    # router's first probe. It is probed again after 0.1 s, 0.3 s, ... not an interval later.
    port = free_port()
    running = await start_router(
        nursery, worker_urls=(f"http://127.0.0.1:{port}",), health_check_interval=60.0
    )
    assert running.router.pool.statistics().healthy == 0
    await start_worker(nursery, port=port)
    with trio.fail_after(20):  # an interval would be 60 s
        await wait_until(lambda: running.router.pool.statistics().healthy == 1)
        response = await client.post(running.url + "/generate", json={"text": "x"})
    assert response.status_code == 200


async def test_wait_for_workers_holds_the_port_until_a_worker_is_healthy(nursery, client):
    port = free_port()

    async def worker_later() -> None:
        await trio.sleep(0.3)
        await start_worker(nursery, port=port)

    nursery.start_soon(worker_later)
    with trio.fail_after(20):
        running = await start_router(
            nursery,
            worker_urls=(f"http://127.0.0.1:{port}",),
            wait_for_workers=15.0,
            health_check_interval=60.0,
        )
        assert running.router.pool.statistics().healthy == 1  # before the port opened
        response = await client.post(running.url + "/generate", json={"text": "x"})
    assert response.status_code == 200


def test_wait_for_workers_gives_up_with_one_line_and_exit_2(capsys):
    port = free_port()  # nothing listens there
    argv = ["serve", "--port", "0", "--worker-urls", f"http://127.0.0.1:{port}"]
    assert main([*argv, "--wait-for-workers", "0.5"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(
        "trio-router: error: no worker became healthy within 0.5 s (--wait-for-workers): "
        f"http://127.0.0.1:{port}: health probe failed: ConnectError"
    )


def test_wait_for_workers_needs_workers_to_wait_for(capsys):
    assert main(["serve", "--port", "0", "--wait-for-workers", "5"]) == 2
    assert "wait_for_workers needs worker_urls" in one_error_line(capsys)
