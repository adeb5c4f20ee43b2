"""Start-up: the open-file limit and the connections it allows; options that make no sense.

The file-limit tests run the router in a child process whose limit is lowered first
(``resource.setrlimit``), so exhausting it takes a few hundred sockets, not thousands.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from trio_router.cli import main

from .conftest import start_router
from .test_cli import read_line_with

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
