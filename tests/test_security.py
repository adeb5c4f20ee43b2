"""Secure by default: admin guard, worker allow-list, relayed paths, API keys as tenants, limits."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
import trio

from trio_router.errors import Forbidden, Unauthorized
from trio_router.security import Gate, check_worker, is_loopback, parse_allow

from .conftest import start_router, start_worker
from .test_proxy import wait_until

DEFAULT = parse_allow(["loopback", "private"])


def addresses(*texts: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(t) for t in texts]


@pytest.mark.parametrize(
    ("url", "resolved"),
    [
        ("http://127.0.0.1:8000", ["127.0.0.1"]),
        ("http://localhost:8000", ["127.0.0.1"]),
        ("http://[::1]:8000", ["::1"]),
        ("http://10.1.2.3:30000", ["10.1.2.3"]),
        ("http://192.168.0.7:30000", ["192.168.0.7"]),
        ("http://gpu-7.cluster.local:30000", ["172.20.0.9"]),
    ],
)
def test_loopback_and_private_workers_are_admitted_by_default(url, resolved):
    check_worker(url, addresses(*resolved), DEFAULT)


@pytest.mark.parametrize(
    ("url", "resolved", "why"),
    [
        ("http://169.254.169.254:80", ["169.254.169.254"], "link-local"),
        ("http://[::ffff:169.254.169.254]:80", ["::ffff:169.254.169.254"], "link-local"),
        ("http://[fe80::1]:80", ["fe80::1"], "link-local"),
        ("http://[fd00:ec2::254]:80", ["fd00:ec2::254"], "link-local"),
        ("http://metadata.google.internal:80", ["169.254.169.254"], "metadata"),
        ("http://innocent.example:80", ["169.254.169.254"], "link-local"),  # a name hiding it
        ("http://8.8.8.8:80", ["8.8.8.8"], "not in the allow-list"),
        ("http://0.0.0.0:80", ["0.0.0.0"], "never a worker"),
    ],
)
def test_metadata_link_local_and_public_workers_are_refused(url, resolved, why):
    with pytest.raises(Forbidden, match=why):
        check_worker(url, addresses(*resolved), DEFAULT)


def test_metadata_stays_refused_even_when_everything_is_allowed():
    with pytest.raises(Forbidden):
        check_worker(
            "http://169.254.169.254:80", addresses("169.254.169.254"), parse_allow(["any"])
        )
    check_worker("http://8.8.8.8:80", addresses("8.8.8.8"), parse_allow(["any"]))


def test_allow_rules_with_ports_cidrs_and_domains():
    rules = parse_allow(["10.0.0.0/24:30000", "*.gpu.example", "node-1:8000"])
    check_worker("http://10.0.0.9:30000", addresses("10.0.0.9"), rules)
    check_worker("http://a.gpu.example:1", addresses("203.0.113.5"), rules)
    check_worker("http://node-1:8000", addresses("203.0.113.6"), rules)
    for url, ip in (
        ("http://10.0.0.9:30001", "10.0.0.9"),
        ("http://10.0.1.9:30000", "10.0.1.9"),
        ("http://node-1:8001", "203.0.113.6"),
    ):
        with pytest.raises(Forbidden):
            check_worker(url, addresses(ip), rules)


def test_admin_gate_token_loopback_and_insecure_mode():
    assert is_loopback("127.0.0.1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.2")
    open_gate = Gate()
    open_gate.check_admin(None, "127.0.0.1")
    with pytest.raises(Forbidden, match="loopback clients only"):
        open_gate.check_admin(None, "10.0.0.2")
    Gate(insecure_admin=True).check_admin(None, "10.0.0.2")
    locked = Gate(admin_token="s3cret-token")
    locked.check_admin("Bearer s3cret-token", "10.0.0.2")
    for header in (None, "Bearer wrong", "s3cret-token", "Basic s3cret-token"):
        with pytest.raises(Unauthorized):
            locked.check_admin(header, "127.0.0.1")  # a set token binds loopback too


def test_api_keys_name_tenants():
    gate = Gate(api_keys=("alpha", "beta"))
    a, b = gate.tenant("Bearer alpha"), gate.tenant("Bearer beta")
    assert a != b
    assert "alpha" not in a  # the key itself never becomes a namespace
    with pytest.raises(Unauthorized):
        gate.tenant(None)
    with pytest.raises(Unauthorized):
        gate.tenant("Bearer gamma")
    assert Gate().tenant(None) is None


async def test_admin_endpoints_need_the_token_when_set(nursery, client):
    worker = await start_worker(nursery)
    running = await start_router(nursery, admin_token="s3cret-token")
    url = running.url
    with trio.fail_after(10):
        anonymous = await client.post(url + "/add_worker", params={"url": worker.url})
        wrong = await client.post(
            url + "/add_worker", params={"url": worker.url}, headers={"Authorization": "Bearer x"}
        )
        listed = (await client.get(url + "/list_workers")).json()
        right = await client.post(
            url + "/add_worker",
            params={"url": worker.url},
            headers={"Authorization": "Bearer s3cret-token"},
        )
        delete = await client.delete(url + "/workers", params={"url": worker.url})
    assert (anonymous.status_code, wrong.status_code) == (401, 401)
    assert listed == {"urls": []}
    assert right.status_code == 200
    assert delete.status_code == 401


async def test_a_metadata_worker_registration_is_refused_and_changes_nothing(nursery, client):
    running = await start_router(nursery)
    with trio.fail_after(10):
        refused = await client.post(
            running.url + "/add_worker", params={"url": "http://169.254.169.254:80"}
        )
        mapped = await client.post(
            running.url + "/workers", json={"url": "http://[::ffff:a9fe:a9fe]:80"}
        )
        listed = (await client.get(running.url + "/list_workers")).json()
    assert refused.status_code == 403
    assert "link-local" in refused.json()["error"]["message"]
    assert mapped.status_code == 403
    assert listed == {"urls": []}


async def test_worker_control_calls_are_admin_broadcasts_with_per_worker_results(nursery, client):
    workers = [await start_worker(nursery) for _ in range(2)]
    running = await start_router(
        nursery, worker_urls=tuple(w.url for w in workers), admin_token="s3cret-token"
    )
    admin = {"Authorization": "Bearer s3cret-token"}
    with trio.fail_after(10):
        refused = await client.post(
            running.url + "/update_weights_from_disk", json={"model_path": "m"}
        )
        done = await client.post(
            running.url + "/update_weights_from_disk", json={"model_path": "m"}, headers=admin
        )
        aborted = await client.post(
            running.url + "/abort_request", json={"abort_all": True}, headers=admin
        )
    assert refused.status_code == 401
    assert done.status_code == 200
    report = done.json()
    assert report["ok"] is True
    assert sorted(report["results"]) == sorted(w.url for w in workers)
    assert all(r["status"] == 200 for r in report["results"].values())
    assert [w.app.weight_version for w in workers] == ["v1", "v1"]
    assert aborted.json()["workers"] == 2


async def test_api_keys_are_required_and_scope_trajectories_and_sessions(nursery, client, qwen3):
    worker = await start_worker(nursery, tokenizer=qwen3)
    running = await start_router(
        nursery,
        tokenizer=qwen3,
        worker_urls=(worker.url,),
        radix_tree_max_size=100_000,
        api_key=("key-a", "key-b"),
    )
    url = running.url
    a = {"Authorization": "Bearer key-a"}
    b = {"Authorization": "Bearer key-b"}
    with trio.fail_after(20):
        anonymous = await client.post(url + "/generate", json={"text": "hi"})
        answer = (
            await client.post(url + "/generate", json={"text": "Hello there"}, headers=a)
        ).json()
        text = "Hello there" + answer["text"]
        mine = (
            await client.post(url + "/retrieve_from_text", json={"text": text}, headers=a)
        ).json()
        theirs = (
            await client.post(url + "/retrieve_from_text", json={"text": text}, headers=b)
        ).json()
        session = (await client.post(url + "/sessions", headers=a)).json()["session_id"]
        peek = await client.get(f"{url}/sessions/{session}", headers=b)
        health = await client.get(url + "/health")
    assert anonymous.status_code == 401
    assert sum(mine["loss_mask"]) > 0
    assert theirs["cached_tokens"] == 0
    assert set(theirs["rollout_logp"]) == {0.0}
    assert peek.status_code == 404
    assert health.status_code == 200  # health stays open for probes


async def test_too_many_concurrent_requests_get_503_with_retry_after(nursery, client):
    worker = await start_worker(nursery, latency_per_token_ms=50)
    running = await start_router(nursery, worker_urls=(worker.url,), max_concurrent_requests=1)
    statuses: list[int] = []

    async def slow() -> None:
        r = await client.post(
            running.url + "/generate",
            json={"text": "x", "sampling_params": {"max_new_tokens": 10, "ignore_eos": True}},
        )
        statuses.append(r.status_code)

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(slow)
            await wait_until(lambda: worker.app.stats.active == 1)
            busy = await client.post(running.url + "/generate", json={"text": "y"})
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "1"
    assert statuses == [200]


async def test_oversized_request_heads_are_refused(nursery, client):
    worker = await start_worker(nursery)
    running = await start_router(nursery, worker_urls=(worker.url,), max_header_size=4096)
    with trio.fail_after(10):
        r = await client.post(
            running.url + "/generate", json={"text": "x"}, headers={"X-Big": "a" * 10_000}
        )
    assert r.status_code == 431
    assert worker.app.stats.requests.get("/generate", 0) == 0


async def test_a_broken_http2_upload_closes_its_connection_not_the_router(nursery, client):
    import httpx

    running = await start_router(nursery)
    with trio.fail_after(20):
        async with httpx.AsyncClient(http1=False, http2=True) as h2:
            # the connection may be reset; what matters is that the router stays up
            with contextlib.suppress(httpx.HTTPError):
                await h2.post(running.url + "/retrieve_from_text", content=b"x" * 200_000)
        health = await client.get(running.url + "/health")
    assert health.status_code == 200
