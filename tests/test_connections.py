"""The bookkeeping of client connections and throttled log lines (pure, no sockets)."""

from __future__ import annotations

import logging

import pytest

from trio_router.connections import (
    FILE_RESERVE,
    MAX_AUTO_CONNECTIONS,
    ConnectionTable,
    client_connection_budget,
)
from trio_router.log_throttle import Throttle, ThrottledLog


def test_the_budget_leaves_room_for_upstream_connections_and_files():
    assert client_connection_budget(4096, 1024, 0) == 4096 - FILE_RESERVE - 1024
    assert client_connection_budget(1 << 20, 1024, 0) == MAX_AUTO_CONNECTIONS
    assert client_connection_budget(1 << 20, 1024, 50_000) == 50_000  # asked for, and fits


def test_a_small_file_limit_gives_upstream_half_and_clients_the_rest():
    assert client_connection_budget(1024, 1024, 0) == 1024 - FILE_RESERVE - 512
    assert client_connection_budget(1024, 1024, 5000) == 1024 - FILE_RESERVE - 512
    assert client_connection_budget(100, 1024, 0) == 1  # never none


def test_a_newcomer_replaces_the_connection_waiting_longest_on_its_client():
    table: ConnectionTable[str] = ConnectionTable(3)
    table.admit("a", 1.0)
    table.admit("b", 2.0)
    table.admit("c", 3.0)
    table.receiving("a", 4.0)  # a's request started at 4: b has waited longest
    assert table.full
    assert table.make_room(lambda key: True) == "b"
    assert len(table) == 2
    assert not table.full


def test_a_connection_receiving_its_body_since_long_goes_before_an_idle_one():
    table: ConnectionTable[str] = ConnectionTable(2)
    table.admit("slow body", 1.0)
    table.receiving("slow body", 1.5)
    table.admit("idle", 2.0)
    assert table.make_room(lambda key: True) == "slow body"


def test_connections_that_are_responding_are_never_chosen():
    table: ConnectionTable[str] = ConnectionTable(2)
    table.admit("streaming", 1.0)
    table.receiving("streaming", 1.0)
    table.admit("busy", 2.0)
    table.receiving("busy", 2.0)
    assert table.make_room(lambda key: False) is None  # both have their bodies
    assert len(table) == 2
    table.waiting("busy", 5.0)  # its answer is out: idle, so a candidate again
    assert table.make_room(lambda key: False) == "busy"


def test_removing_a_connection_twice_or_after_it_made_room_changes_nothing():
    table: ConnectionTable[str] = ConnectionTable(2)
    table.admit("a", 1.0)
    table.admit("b", 2.0)
    assert table.make_room(lambda key: True) == "a"
    table.remove("a")  # its task ends later
    table.waiting("a", 3.0)  # and hypercorn may still report it idle
    assert len(table) == 1
    table.remove("b")
    table.remove("b")
    assert len(table) == 0
    assert table.make_room(lambda key: True) is None


def test_a_throttle_lets_one_through_per_interval_and_counts_the_rest():
    throttle = Throttle(1.0)
    assert throttle.passes(0.0) == 0
    assert [throttle.passes(t) for t in (0.1, 0.5, 0.9)] == [None, None, None]
    assert throttle.passes(1.0) == 3
    assert throttle.passes(1.5) is None


def test_a_throttled_log_says_how_many_lines_it_left_out(caplog: pytest.LogCaptureFixture):
    logger = logging.getLogger("test.throttled")
    lines = ThrottledLog(logger, 10.0)
    caplog.set_level(logging.INFO, logger="test.throttled")
    for now in range(25):
        lines.log(float(now), logging.INFO, "refused one from %s", "10.0.0.1")
    assert [r.getMessage() for r in caplog.records] == [
        "refused one from 10.0.0.1",
        "refused one from 10.0.0.1 (9 more like it since the last such line)",
        "refused one from 10.0.0.1 (9 more like it since the last such line)",
    ]
