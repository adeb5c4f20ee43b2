"""Shared fixtures.

Testing policy for end-to-end tests: real HTTP servers on 127.0.0.1 port 0,
started in the test's own nursery with ``nursery.start``; every test body
runs under ``trio.fail_after``; anything timed runs on ``autojump_clock``
with no sockets; no wall-clock thresholds in assertions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from trio_router import RouterConfig, RunningRouter, serve
from trio_router.sim import SimWorkerConfig, SimWorkerHandle, serve_sim_worker
from trio_router.tokenizer import Tokenizer, load_tokenizer

from .scripted import ScriptedUpstream, serve_scripted


def router_config(**overrides: Any) -> RouterConfig:
    base = RouterConfig(port=0, health_check_interval=0.5, health_check_timeout=1.0, seed=1)
    return dataclasses.replace(base, **overrides)


async def start_router(
    nursery: trio.Nursery, *, tokenizer: Tokenizer | None = None, **overrides: Any
) -> RunningRouter:
    running: RunningRouter = await nursery.start(
        partial(serve, router_config(**overrides), tokenizer=tokenizer)
    )
    return running


async def start_worker(
    nursery: trio.Nursery, *, tokenizer: Tokenizer | None = None, **overrides: Any
) -> SimWorkerHandle:
    overrides.setdefault("tokenizer", "bytes")
    handle: SimWorkerHandle = await nursery.start(
        partial(serve_sim_worker, SimWorkerConfig(**overrides), tokenizer=tokenizer)
    )
    return handle


@pytest.fixture(scope="session")
def qwen3() -> Tokenizer:
    """The shipped Qwen3 tokenizer, loaded once for the whole run."""
    return load_tokenizer()


async def start_scripted(nursery: trio.Nursery) -> tuple[ScriptedUpstream, str]:
    result: tuple[ScriptedUpstream, str] = await nursery.start(serve_scripted)
    return result


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c
