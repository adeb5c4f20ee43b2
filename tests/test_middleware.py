"""Middleware plugins: loading, ordering, rewriting, answering, and failing safely."""

from __future__ import annotations

import pytest
import trio

from trio_router.errors import ConfigError
from trio_router.hooks import load_middleware

from . import plugins
from .conftest import start_router, start_scripted
from .test_proxy import wait_until


async def test_hooks_run_in_the_order_the_plugins_were_listed(nursery, client):
    plugins.CALLS.clear()
    _upstream, url = await start_scripted(nursery)
    running = await start_router(
        nursery,
        worker_urls=(url,),
        middleware_paths=("tests.plugins.First", "tests.plugins.Second"),
    )
    with trio.fail_after(10):
        response = await client.post(running.url + "/generate", json={"text": "x"})
        await wait_until(lambda: len(plugins.CALLS) == 6)
    assert response.status_code == 200
    assert plugins.CALLS == [
        "first.on_request",
        "second.on_request",
        "first.on_route:least_load",
        "first.on_response_start",
        "first.on_response_end:200:True",
        "second.on_response_end",
    ]


async def test_a_plugin_can_answer_without_a_worker(nursery, client):
    upstream, url = await start_scripted(nursery)
    running = await start_router(
        nursery, worker_urls=(url,), middleware_paths=("tests.plugins.AnswerPing",)
    )
    with trio.fail_after(10):
        response = await client.get(running.url + "/plugin/ping")
    assert response.json() == {"pong": True}
    assert [s.path for s in upstream.seen if s.path != "/health"] == []


async def test_a_plugin_can_rewrite_the_request_and_the_response(nursery, client):
    upstream, url = await start_scripted(nursery)
    running = await start_router(
        nursery,
        worker_urls=(url,),
        middleware_paths=("tests.plugins.RewriteBody", "tests.plugins.Shout"),
    )
    with trio.fail_after(10):
        response = await client.post(running.url + "/generate", json={"text": "x"})
    assert upstream.seen[-1].body == b'{"text":"x","added_by_plugin":true}'
    assert response.content == b"{}"  # the scripted answer, upper-cased (no letters)
    assert "content-length" not in response.headers  # the length may have changed


async def test_an_exception_in_a_plugin_is_a_clean_500_and_the_router_stays_up(nursery, client):
    _upstream, url = await start_scripted(nursery)
    running = await start_router(
        nursery, worker_urls=(url,), middleware_paths=("tests.plugins.Boom",)
    )
    with trio.fail_after(10):
        early = await client.post(
            running.url + "/generate", json={}, headers={"x-boom": "on_request"}
        )
        late = await client.post(
            running.url + "/generate", json={}, headers={"x-boom": "on_response_start"}
        )
        refused = await client.post(
            running.url + "/generate", json={}, headers={"x-boom": "forbidden"}
        )
        fine = await client.post(running.url + "/generate", json={})
        await wait_until(lambda: running.router.pool.statistics().total_inflight == 0)
    assert early.status_code == 500
    assert early.json()["error"] == {
        "message": "middleware Boom failed in on_request: ValueError: kaboom",
        "type": "plugin_error",
        "code": 500,
    }
    assert late.status_code == 500
    assert "on_response_start" in late.json()["error"]["message"]
    assert refused.status_code == 403
    assert fine.status_code == 200
    worker = running.router.pool.get(url)
    assert worker is not None
    assert worker.state.value == "healthy"  # a plugin's failure is not the worker's


def test_a_bad_dotted_path_is_a_clear_error_at_start():
    with pytest.raises(ConfigError, match="cannot import middleware module 'no_such_module'"):
        load_middleware(["no_such_module.Thing"], router=None)
    with pytest.raises(ConfigError, match=r"must be module\.ClassName"):
        load_middleware(["Thing"], router=None)
    with pytest.raises(ConfigError, match="must name a subclass"):
        load_middleware(["tests.plugins.NotAMiddleware"], router=None)
    with pytest.raises(ConfigError, match="must name a subclass"):
        load_middleware(["tests.plugins.Missing"], router=None)


def test_the_shipped_example_plugin_loads():
    (plugin,) = load_middleware(["trio_router.middleware_examples.StampWorker"], router=None)
    assert type(plugin).__name__ == "StampWorker"
