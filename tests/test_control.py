"""The control plane: worker administration, health, metrics, over real sockets."""

from __future__ import annotations

import pytest
import trio

from .conftest import start_router, start_worker
from .test_proxy import wait_until


async def test_add_list_and_remove_workers_in_every_accepted_form(nursery, client):
    w1 = await start_worker(nursery)
    w2 = await start_worker(nursery)
    w3 = await start_worker(nursery)
    running = await start_router(nursery)
    base = running.url
    with trio.fail_after(10):
        by_query = await client.post(base + "/add_worker", params={"url": w1.url})
        by_alias = await client.post(base + "/add_worker", params={"worker_url": w2.url + "/"})
        by_json = await client.post(base + "/workers", json={"url": w3.url})
        listed = (await client.get(base + "/list_workers")).json()
        workers = (await client.get(base + "/workers")).json()
    assert by_query.status_code == 200
    assert by_query.json()["added"] is True
    assert by_query.json()["worker"]["state"] == "healthy"  # probed before answering
    assert by_alias.json()["worker"]["url"] == w2.url  # trailing slash normalised away
    assert by_json.status_code == 200
    assert listed == {"urls": [w1.url, w2.url, w3.url]}
    assert [(w["url"], w["healthy"], w["inflight"]) for w in workers["workers"]] == [
        (w1.url, True, 0),
        (w2.url, True, 0),
        (w3.url, True, 0),
    ]
    with trio.fail_after(10):
        await client.post(base + "/remove_worker", json={"url": w1.url})
        await client.delete(base + "/workers", params={"url": w2.url})
        await client.delete(base + "/workers/" + w3.url)
        listed = (await client.get(base + "/list_workers")).json()
    assert listed == {"urls": []}


async def test_adding_a_known_worker_is_idempotent(nursery, client):
    worker = await start_worker(nursery)
    running = await start_router(nursery, worker_urls=(worker.url,))
    with trio.fail_after(10):
        again = await client.post(running.url + "/add_worker", params={"url": worker.url})
        listed = (await client.get(running.url + "/list_workers")).json()
    assert again.status_code == 200
    assert again.json()["added"] is False
    assert listed == {"urls": [worker.url]}


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({}, "worker url is required"),
        ({"params": {"url": ""}}, "worker url is required"),
        ({"params": {"url": "ftp://10.0.0.1:21"}}, "scheme must be http or https"),
        ({"params": {"url": "10.0.0.1:8000"}}, "needs a scheme"),
        ({"params": {"url": "http://10.0.0.1:8000/generate"}}, "without a path"),
        ({"params": {"url": "http://user:pw@10.0.0.1:8000"}}, "credentials"),
        ({"params": {"url": "http://10.0.0.1:99999"}}, "invalid worker url"),
        ({"content": b"{not json"}, "not valid JSON"),
        ({"content": b"[1, 2]"}, "must be a JSON object"),
        ({"json": {"url": 42}}, "worker url is required"),
    ],
)
async def test_bad_admin_input_is_a_clear_4xx_and_changes_nothing(nursery, client, form, message):
    worker = await start_worker(nursery)
    running = await start_router(nursery, worker_urls=(worker.url,))
    with trio.fail_after(10):
        response = await client.post(running.url + "/add_worker", **form)
        listed = (await client.get(running.url + "/list_workers")).json()
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]
    assert listed == {"urls": [worker.url]}


async def test_removing_an_unknown_worker_is_404(nursery, client):
    running = await start_router(nursery)
    with trio.fail_after(10):
        response = await client.post(
            running.url + "/remove_worker", params={"url": "http://10.0.0.9:1"}
        )
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


async def test_an_unreachable_worker_is_registered_but_gets_no_traffic(nursery, client):
    running = await start_router(nursery)
    with trio.fail_after(10):
        added = await client.post(running.url + "/add_worker", params={"url": "http://127.0.0.1:9"})
        routed = await client.post(running.url + "/generate", json={"text": "x"})
    assert added.json()["worker"]["state"] == "pending"
    assert added.json()["worker"]["healthy"] is False
    assert routed.status_code == 503


async def test_health_readiness_and_json_metrics(nursery, client):
    w1 = await start_worker(nursery)
    w2 = await start_worker(nursery)
    w2.app.faults.health_status = 500
    running = await start_router(nursery, worker_urls=(w1.url, w2.url))
    with trio.fail_after(10):
        await client.post(running.url + "/generate", json={"text": "x"})
        health = (await client.get(running.url + "/health")).json()
        ready = await client.get(running.url + "/readiness")
        metrics = (await client.get(running.url + "/metrics")).json()
    assert health["status"] == "degraded"
    assert (health["healthy_workers"], health["total_workers"]) == (1, 2)
    assert health["services"]["health"]["running"] is True
    assert ready.status_code == 200
    assert metrics["router"]["active_workers"] == 1
    assert metrics["router"]["worker_loads"] == {w1.url: 0, w2.url: 0}
    assert metrics["router"]["total_in_flight"] == 0
    assert "cache" in metrics


async def test_readiness_is_503_without_healthy_workers(nursery, client):
    running = await start_router(nursery)
    with trio.fail_after(10):
        ready = await client.get(running.url + "/readiness")
        health = await client.get(running.url + "/health")
    assert ready.status_code == 503
    assert health.status_code == 200
    assert health.json()["status"] == "unavailable"


async def test_prometheus_exposition_on_the_path_and_on_its_own_port(nursery, client):
    worker = await start_worker(nursery)
    running = await start_router(nursery, worker_urls=(worker.url,), prometheus_port=0)
    assert running.prometheus_url is not None
    with trio.fail_after(10):
        await client.post(running.url + "/generate", json={"text": "x"})
        await client.post(running.url + "/generate", content=b"{bad")
        await wait_until(lambda: running.router.pool.statistics().total_inflight == 0)
        on_path = await client.get(running.url + "/prometheus")
        on_port = await client.get(running.prometheus_url + "/metrics")
    assert on_path.headers["content-type"].startswith("text/plain")
    text = on_path.text
    for line in (
        f'trio_router_requests_total{{path="/generate",status="200",worker="{worker.url}"}} 1.0',
        f'trio_router_requests_total{{path="/generate",status="400",worker="{worker.url}"}} 1.0',
        'trio_router_policy_decisions_total{branch="least_load",policy="least_inflight"} 2.0',
        f'trio_router_worker_inflight{{worker="{worker.url}"}} 0.0',
        f'trio_router_worker_healthy{{worker="{worker.url}"}} 1.0',
        'trio_router_health_checks_total{result="ok"} 1.0',
    ):
        assert line in text, line
    assert "trio_router_request_duration_seconds_bucket" in text
    assert "trio_router_requests_total" in on_port.text
    with trio.fail_after(10):
        elsewhere = await client.post(running.prometheus_url + "/generate", json={})
    assert elsewhere.status_code == 404


async def test_worker_paths_are_relayed_and_unknown_ones_refused(nursery, client):
    worker = await start_worker(nursery)
    running = await start_router(nursery, worker_urls=(worker.url,), proxy_allow=("/extra/",))
    with trio.fail_after(10):
        info = await client.get(running.url + "/get_model_info")
        missing = await client.get(running.url + "/no/such/path")
        allowed = await client.get(running.url + "/extra/thing")
    assert info.status_code == 200
    assert info.json()["model_path"] == "trio-router/sim"
    assert missing.status_code == 403
    assert "--proxy-allow" in missing.json()["error"]["message"]
    assert "/no/such/path" not in worker.app.stats.requests
    assert allowed.status_code == 404  # relayed: the worker's own 404
    assert worker.app.stats.requests["/extra/thing"] == 1


async def test_an_engine_deregisters_as_slime_and_miles_do_with_the_gateway(nursery, client):
    """With ``sglang_router >= 0.3.0`` installed, slime and miles remove an engine on
    shutdown by ``GET /workers`` -> ``worker["id"]`` -> ``DELETE /workers/{id}``."""
    mine, other = await start_worker(nursery), await start_worker(nursery)
    running = await start_router(nursery, worker_urls=(other.url,))
    base = running.url
    with trio.fail_after(10):
        added = (await client.post(base + "/workers", json={"url": mine.url})).json()
        assert added["location"] == "/workers/" + added["worker_id"]
        listed = (await client.get(base + "/workers")).json()["workers"]
        [entry] = [w for w in listed if w["url"] == mine.url]
        assert {"id", "is_healthy", "load", "worker_type"} <= set(entry)
        assert entry["id"] == added["worker_id"]
        one = await client.get(base + "/workers/" + entry["id"])
        assert one.json()["url"] == mine.url
        removed = await client.delete(base + "/workers/" + entry["id"])
        missing = await client.get(base + "/workers/" + entry["id"])
    assert removed.status_code == 202
    assert removed.json()["status"] == "accepted"
    assert running.router.pool.urls() == [other.url]
    assert missing.status_code == 404
