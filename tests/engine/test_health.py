"""Health checks against a real engine: kill it by PID, restart it."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from .conftest import Engine, start_engine_router
from .wire import GREEDY, chat_prompt

REQUEST = {"text": chat_prompt("Hi"), "sampling_params": {"max_new_tokens": 2, **GREEDY}}


async def state_of(client: httpx.AsyncClient, router_url: str, engine: Engine) -> Any:
    workers = (await client.get(router_url + "/workers")).json()["workers"]
    return next(w["state"] for w in workers if w["url"] == engine.url)


async def wait_for_state(
    client: httpx.AsyncClient, router_url: str, engine: Engine, state: str, limit: float
) -> None:
    with trio.fail_after(limit):
        while await state_of(client, router_url, engine) != state:  # noqa: ASYNC110
            await trio.sleep(0.2)  # the router's view, polled over HTTP


async def test_a_killed_engine_is_quarantined_and_readmitted_once_restarted(
    nursery, client, qwen3, killable_engine
):
    engine = killable_engine
    router = await start_engine_router(
        nursery,
        qwen3,
        engine,
        health_check_endpoint="/health",  # the default, and SGLang's: a 1-token generation
        health_check_interval=1.0,
        health_check_timeout=10.0,
        health_check_failure_threshold=2,
        health_check_success_threshold=2,
    )
    with trio.fail_after(250):
        assert (await client.post(router.url + "/generate", json=REQUEST)).status_code == 200
        engine.kill()
        await wait_for_state(client, router.url, engine, "quarantined", limit=30)
        refused = await client.post(router.url + "/generate", json=REQUEST)
        # the partial-UTF-8 tests run next on it: coming back on that model saves a restart
        await trio.to_thread.run_sync(engine.restart, "partial-utf8")
        await wait_for_state(client, router.url, engine, "healthy", limit=60)
        served = await client.post(router.url + "/generate", json=REQUEST)
    assert refused.status_code == 503
    assert "no healthy worker" in refused.json()["error"]["message"]
    assert served.status_code == 200, served.text
