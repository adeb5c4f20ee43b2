"""Secure by default: admin guard, worker allow-list, relayed paths, API keys as tenants, limits."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
import trio

from trio_router.errors import BadRequest, Forbidden, Unauthorized
from trio_router.security import (
    Gate,
    check_target,
    check_worker,
    is_loopback,
    parse_allow,
    resolve_host,
)

from .conftest import start_router, start_scripted, start_worker
from .scripted import Seen
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
        update = {"model_path": "trio-router/sim", "weight_version": "v1"}
        done = await client.post(
            running.url + "/update_weights_from_disk", json=update, headers=admin
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


# -- worker URLs that broke registration -------------------------------------------------


async def test_a_malformed_host_or_port_0_is_a_400_and_changes_nothing(nursery, client):
    running = await start_router(nursery)
    with trio.fail_after(10):
        answers = [
            await client.post(running.url + "/add_worker", params={"url": url})
            for url in ("http://a..b:8000", "http://127.0.0.1:0", "http://-x-:1")
        ]
        listed = (await client.get(running.url + "/list_workers")).json()
    assert [a.status_code for a in answers] == [400, 400, 400]
    assert "'a..b' is not a valid host name" in answers[0].json()["error"]["message"]
    assert "port 0" in answers[1].json()["error"]["message"]
    assert listed == {"urls": []}


def test_a_malformed_worker_host_at_start_is_one_line_and_exit_2(capsys):
    from trio_router.cli import main

    assert main(["serve", "--port", "0", "--worker-urls", "http://a..b:8000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "trio-router: error: --worker-urls: invalid worker url 'http://a..b:8000': "
        "'a..b' is not a valid host name"
    ]


async def test_a_name_the_resolver_cannot_encode_is_a_bad_request():
    with pytest.raises(BadRequest, match="does not resolve"):
        await resolve_host("a..b", 80)


# -- the router's credentials stay with the router --------------------------------------


def header(seen: Seen, name: bytes) -> list[bytes]:
    return [value for key, value in seen.headers if key == name]


async def test_the_routers_credentials_never_reach_a_worker(nursery, client):
    upstream, url = await start_scripted(nursery)
    running = await start_router(
        nursery, worker_urls=(url,), admin_token="s3cret-token", api_key=("key-a",)
    )
    with trio.fail_after(10):
        generated = await client.post(
            running.url + "/generate",
            json={},
            headers={"Authorization": "Bearer key-a", "X-Session-Token": "tok"},
        )
        flushed = await client.post(
            running.url + "/flush_cache", headers={"Authorization": "Bearer s3cret-token"}
        )
    assert (generated.status_code, flushed.status_code) == (200, 200)
    [generate] = [s for s in upstream.seen if s.path == "/generate"]
    [flush] = [s for s in upstream.seen if s.path == "/flush_cache"]
    for seen in (generate, flush):
        assert header(seen, b"authorization") == []
        assert header(seen, b"x-session-token") == []


async def test_workers_get_their_own_key_on_every_call(nursery, client):
    upstream, url = await start_scripted(nursery)
    running = await start_router(
        nursery, worker_urls=(url,), api_key=("key-a",), worker_api_key="worker-key-1"
    )
    with trio.fail_after(10):
        generated = await client.post(
            running.url + "/generate", json={}, headers={"Authorization": "Bearer key-a"}
        )
        flushed = await client.post(running.url + "/flush_cache")  # from loopback: admin
        await wait_until(lambda: any(s.path == "/health" for s in upstream.seen))
    assert (generated.status_code, flushed.status_code) == (200, 200)
    paths = {s.path for s in upstream.seen}
    assert {"/generate", "/flush_cache", "/health"} <= paths
    for seen in upstream.seen:  # data plane, broadcast and probes alike
        assert header(seen, b"authorization") == [b"Bearer worker-key-1"], seen.path


async def test_without_router_credentials_the_clients_authorization_passes(nursery, client):
    upstream, url = await start_scripted(nursery)
    running = await start_router(nursery, worker_urls=(url,), admin_token="s3cret-token")
    with trio.fail_after(10):
        mine = await client.post(
            running.url + "/generate", json={}, headers={"Authorization": "Bearer for-sglang"}
        )
        leaked = await client.post(
            running.url + "/generate", json={}, headers={"Authorization": "Basic s3cret-token"}
        )
    assert (mine.status_code, leaked.status_code) == (200, 200)
    first, second = [s for s in upstream.seen if s.path == "/generate"]
    assert header(first, b"authorization") == [b"Bearer for-sglang"]
    assert header(second, b"authorization") == []  # the admin token, however it is spelled


def test_gate_worker_headers():
    plain = [(b"content-type", b"application/json"), (b"authorization", b"Bearer x")]
    assert Gate().worker_headers(plain) is plain
    assert Gate(api_keys=("k",)).worker_headers(plain) == plain[:1]
    assert Gate(admin_token="s3cret-token").worker_headers(plain) == plain
    keyed = Gate(worker_api_key="w").worker_headers(plain)
    assert keyed == [plain[0], (b"authorization", b"Bearer w")]


# -- paths a worker might read otherwise, and what is relayed ---------------------------


async def raw_status(url: str, target: bytes) -> int:
    """The status the router answers ``GET target`` with, sent as is (httpx would
    normalise the dot segments away before sending)."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(b"GET %s HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n" % target)
        answer = b""
        while b"\r\n" not in answer:
            data = await stream.receive_some(4096)
            if not data:
                break
            answer += data
    return int(answer.split(b" ", 2)[1])


DOT_SEGMENTS = [
    b"/v1/../flush_cache",
    b"/v1/models/../../abort_request",
    b"/v1/%2e%2e/flush_cache",
    b"/v1/%2E%2e/flush_cache",
    b"/v1/models/%252e%252e/x",  # double encoded
    b"/v1/./models",
    b"/v1//models",
    b"//v1/models",
    b"/v1/models/..%5cx",
    b"/v1/models/..\\x",
    b"/files/../flush_cache",
]


async def test_dot_segment_paths_are_refused_before_any_worker_sees_them(nursery):
    upstream, url = await start_scripted(nursery)
    running = await start_router(nursery, worker_urls=(url,), proxy_allow=("/files/",))
    with trio.fail_after(10):
        statuses = [await raw_status(running.url, target) for target in DOT_SEGMENTS]
        plain = await raw_status(running.url, b"/v1/models/a%2Fb")
    assert statuses == [400] * len(DOT_SEGMENTS)
    assert plain == 200  # an encoded slash alone cannot leave a prefix: relayed as sent
    assert [s.path for s in upstream.seen if s.path != "/health"] == ["/v1/models/a/b"]


@pytest.mark.parametrize(
    "target",
    [t.decode() for t in DOT_SEGMENTS if b"%" not in t] + ["/v1/%2e%2e/x", "/x?y=/../z"],
)
def test_check_target_refuses_what_a_worker_might_normalise(target):
    if "?" in target:  # only the path part counts
        check_target(target)
        return
    with pytest.raises(BadRequest, match="dot segments"):
        check_target(target)


async def test_only_inference_and_read_only_paths_are_relayed_by_default(nursery, client):
    upstream, url = await start_scripted(nursery)
    running = await start_router(nursery, worker_urls=(url,))
    refused = ["/v1/files", "/v1/batches", "/v1/files/f-1/content", "/v1/responses/r-1"]
    refused += ["/v1/fine_tuning/jobs", "/get_weight_version", "/get_load"]
    relayed = ["/v1/models", "/v1/models/m", "/v1/loads", "/v1/embeddings", "/v1/rerank"]
    with trio.fail_after(10):
        refusals = [(await client.get(running.url + path)).status_code for path in refused]
        answers = [(await client.get(running.url + path)).status_code for path in relayed]
    assert refusals == [403] * len(refused)
    assert answers == [200] * len(relayed)
    assert {s.path for s in upstream.seen} - {"/health"} == set(relayed)


def test_the_worker_key_may_come_from_the_environment(monkeypatch):
    from trio_router.cli import _secrets_from_environment
    from trio_router.config import RouterConfig

    monkeypatch.setenv("TRIO_ROUTER_WORKER_API_KEY", "from-env")
    assert _secrets_from_environment(RouterConfig()).worker_api_key == "from-env"
    given = RouterConfig(worker_api_key="from-flag")
    assert _secrets_from_environment(given).worker_api_key == "from-flag"
    assert RouterConfig(worker_api_key=" ").problems() == ["worker_api_key must not be empty"]
