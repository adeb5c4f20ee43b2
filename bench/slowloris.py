"""Slow-loris against a router process: how long ``/health`` goes unanswered, and how many
connections the slow clients hold.

The router runs in a child process with its open-file soft limit set first (``--nofile``,
default 1024: a common default, and the one the attack in issue 16 met). This process opens
``--connections`` connections at once and keeps each of them slow, for ``--duration``
seconds; a connection the router closes is opened again at once, as an attacker would:

* **head** -- a request head that never ends: one more byte every ``--interval`` s.
* **body** -- a whole head for ``POST /generate`` with ``content-length: 1000000``,
  then one byte of body every ``--interval`` s.
* **idle** -- a connection that never sends anything.

Meanwhile a probe sends ``GET /health`` on a fresh connection every 0.1 s (2 s timeout).
Figures: the longest time with no probe answered, the worst probe latency, failed probes,
and the connections held open by slow clients (at most, and at the end).

Usage::

    .venv/bin/python bench/slowloris.py [--mode head|body|idle] [--connections 1050]
        [--interval 5] [--duration 40] [--nofile 1024] [--code DIR] [--json PATH]
        [-- ROUTER OPTIONS...]

``--code DIR`` runs the router from another checkout's ``trio_router`` (for a
before/after comparison, e.g. ``git archive <commit> trio_router | tar -x -C DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio
from _harness import (
    LOOPBACK,
    Children,
    answers_health,
    cpu_seconds,
    fmt,
    free_ports,
    print_figures,
    run_bench,
    table,
    wait_until,
    write_json,
)

#: the child: set the open-file soft limit, maybe put another checkout first, run the CLI
CHILD = (
    "import resource, sys\n"
    "soft, code = int(sys.argv[1]), sys.argv[2]\n"
    "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))\n"
    "if code:\n"
    "    sys.path.insert(0, code)\n"
    "from trio_router.cli import main\n"
    "sys.exit(main(sys.argv[3:]))\n"
)
OPENINGS = {
    "head": b"GET /health HTTP/1.1\r\nhost: router\r\nx-padding: ",
    "body": b"POST /generate HTTP/1.1\r\nhost: router\r\ncontent-length: 1000000\r\n\r\n{",
    "idle": b"",
}
PROBE_PERIOD = 0.1
#: the probe, in its own process so that the attack's CPU cannot delay it: GET /health on
#: a fresh connection every PROBE_PERIOD s; prints "started finished ok" per probe
PROBE = (
    "import socket, sys, time\n"
    "port, duration, period = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])\n"
    "print(f'start {time.monotonic():.4f}', flush=True)\n"
    "end = time.monotonic() + duration\n"
    "while time.monotonic() < end:\n"
    "    t = time.monotonic()\n"
    "    try:\n"
    "        s = socket.create_connection(('127.0.0.1', port), timeout=2)\n"
    "        s.sendall(b'GET /health HTTP/1.1\\r\\nhost: r\\r\\nconnection: close\\r\\n\\r\\n')\n"
    "        data = b''\n"
    "        while chunk := s.recv(65536):\n"
    "            data += chunk\n"
    "        s.close()\n"
    "        ok = data.startswith(b'HTTP/1.1 200')\n"
    "    except OSError:\n"
    "        ok = False\n"
    "    now = time.monotonic()\n"
    "    print(f'{t:.4f} {now:.4f} {int(ok)}', flush=True)\n"
    "    time.sleep(max(0.0, period - (now - t)))\n"
)


@dataclass
class Attack:
    """What the slow clients achieved."""

    open_now: int = 0
    opened: int = 0
    closed_by_router: int = 0
    failed_connects: int = 0
    samples: list[int] = field(default_factory=list)


@dataclass
class Probes:
    latencies: list[float] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)
    failed: int = 0


async def cancel_when_closed(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """Read (and drop) what the router sends; cancel ``scope`` once it closes."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await stream.receive_some(4096):
            pass
    scope.cancel()


async def keep_slow(stream: trio.SocketStream, mode: str, interval: float) -> None:
    """Send the opening of a request, then one more byte per ``interval`` (until closed)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_when_closed, stream, nursery.cancel_scope)
        if OPENINGS[mode]:
            await stream.send_all(OPENINGS[mode])
        while True:
            await trio.sleep(interval)
            if mode != "idle":
                await stream.send_all(b"a")


async def slow_client(port: int, mode: str, interval: float, attack: Attack) -> None:
    """One slow connection after another, for as long as the attack runs."""
    while True:
        try:
            stream = await trio.open_tcp_stream(LOOPBACK, port)
        except OSError:
            attack.failed_connects += 1
            await trio.sleep(interval)
            continue
        attack.opened += 1
        attack.open_now += 1
        try:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await keep_slow(stream, mode, interval)
            attack.closed_by_router += 1  # (not when the attack ends: that cancels)
        finally:
            attack.open_now -= 1
            await trio.aclose_forcefully(stream)


def read_probes(log: str) -> Probes:
    """The probe child's lines: ``started finished ok``."""
    probes = Probes()
    for line in log.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        started, finished, ok = float(parts[0]), float(parts[1]), parts[2] == "1"
        if ok:
            probes.latencies.append(finished - started)
            probes.answered_at.append(finished)
        else:
            probes.failed += 1
    return probes


async def sample(attack: Attack) -> None:
    while True:
        await trio.sleep(0.5)
        attack.samples.append(attack.open_now)


async def run(args: argparse.Namespace, children: Children) -> int:
    (port,) = free_ports(1)
    router_args = [a for a in args.router if a != "--"]
    command = [sys.executable, "-c", CHILD, str(args.nofile), str(args.code or "")]
    command += ["serve", "--port", str(port), "--log-level", "warning", *router_args]
    router = children.start("router", command)
    await wait_until(
        "the router", lambda: answers_health(port), children=children, within=args.timeout
    )
    attack = Attack()
    cpu_before = cpu_seconds(router.pid)
    prober = children.start(
        "probe",
        [sys.executable, "-c", PROBE, str(port), str(args.duration), str(PROBE_PERIOD)],
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample, attack)
        for _ in range(args.connections):
            nursery.start_soon(slow_client, port, args.mode, args.interval, attack)
            await trio.sleep(0.001)
        await trio.to_thread.run_sync(prober.proc.wait)
        nursery.cancel_scope.cancel()
    router_cpu = cpu_seconds(router.pid) - cpu_before
    held_at_end = attack.samples[-1] if attack.samples else 0
    probe_log = prober.log_path.read_text()
    probes = read_probes(probe_log)
    started = float(probe_log.split()[1])
    ends = [started, *probes.answered_at, started + args.duration]
    unanswered = max(b - a for a, b in itertools.pairwise(ends)) - PROBE_PERIOD
    latencies = sorted(probes.latencies)
    figures: dict[str, object] = {
        "mode": args.mode,
        "connections": args.connections,
        "health_longest_unanswered_s": max(0.0, unanswered),
        "health_worst_latency_s": latencies[-1] if latencies else math.nan,
        "health_probes_answered": len(latencies),
        "health_probes_failed": probes.failed,
        "held_max": max(attack.samples, default=0),
        "held_at_end": held_at_end,
        "closed_by_router": attack.closed_by_router,
        "failed_connects": attack.failed_connects,
        "router_cpu_share": router_cpu / args.duration,
    }
    router.check_alive()
    log = router.log_path.read_text(errors="replace")
    figures["router_log_kib"] = len(log.encode()) / 1024
    figures["router_log_lines"] = len(log.splitlines())
    print(
        table(
            ["mode", "conns", "longest /health gap s", "worst s", "failed", "held max", "held end"],
            [
                [
                    args.mode,
                    str(args.connections),
                    fmt(max(0.0, unanswered), 2),
                    fmt(latencies[-1] if latencies else math.nan, 3),
                    str(probes.failed),
                    str(figures["held_max"]),
                    str(held_at_end),
                ]
            ],
        )
    )
    print_figures(figures, 3)
    write_json(args.json, figures, args)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(OPENINGS), default="head")
    parser.add_argument("--connections", type=int, default=1050)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between bytes")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of attack")
    parser.add_argument("--nofile", type=int, default=1024, help="the router's soft file limit")
    parser.add_argument("--code", type=Path, help="run trio_router from this directory")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to start")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("router", nargs="*", help="options for trio-router serve (after --)")
    args = parser.parse_args()
    children = Children()
    return run_bench(
        "slowloris", run, args, children, children=children, timeout=args.duration + 120
    )


if __name__ == "__main__":
    sys.exit(main())
