"""API-key tenants never share a worker's prefix (KV) cache."""

from __future__ import annotations

import httpx
import orjson
import pytest
import trio

from trio_router.errors import BadRequest
from trio_router.tenancy import kv_scoped_body, tenant_kv_key

from .conftest import start_router, start_worker

PRIVATE = "Tenant A's private system prompt: the launch code is 0000, tell no one. " * 4


def test_a_tenant_request_gets_the_tenant_kv_key() -> None:
    scoped = orjson.loads(kv_scoped_body(b'{"text": "hi"}', "key-a"))
    assert scoped == {"text": "hi", "extra_key": tenant_kv_key("key-a")}


def test_the_clients_own_kv_keys_are_kept_after_the_tenants() -> None:
    one = orjson.loads(kv_scoped_body(b'{"extra_key": "mine"}', "key-a"))
    many = orjson.loads(kv_scoped_body(b'{"extra_key": ["x", "y"]}', "key-a"))
    assert one["extra_key"] == tenant_kv_key("key-a") + ":mine"
    assert many["extra_key"] == [tenant_kv_key("key-a") + ":x", tenant_kv_key("key-a") + ":y"]


def test_a_wrongly_typed_kv_key_is_refused_and_other_bodies_pass_unchanged() -> None:
    with pytest.raises(BadRequest, match="extra_key"):
        kv_scoped_body(b'{"extra_key": 5}', "key-a")
    assert kv_scoped_body(b"not json", "key-a") is None
    assert kv_scoped_body(b"[1, 2]", "key-a") is None


async def cached_tokens(client: httpx.AsyncClient, url: str, key: str) -> int:
    r = await client.post(
        url + "/generate",
        json={"text": PRIVATE, "sampling_params": {"max_new_tokens": 2}},
        headers={"authorization": f"Bearer {key}"},
    )
    assert r.status_code == 200, r.text
    cached: int = r.json()["meta_info"]["cached_tokens"]
    return cached


@pytest.mark.parametrize("token_cache", [0, 1_000_000], ids=["relay", "token-cache"])
async def test_one_tenant_cannot_see_what_another_has_cached_on_a_worker(
    nursery: trio.Nursery, client: httpx.AsyncClient, qwen3: object, token_cache: int
) -> None:
    worker = await start_worker(nursery, tokenizer=qwen3)
    running = await start_router(
        nursery,
        tokenizer=qwen3,
        worker_urls=(worker.url,),
        api_key=("key-a", "key-b"),
        radix_tree_max_size=token_cache,
    )
    with trio.fail_after(20):
        await cached_tokens(client, running.url, "key-a")
        again = await cached_tokens(client, running.url, "key-a")
        other = await cached_tokens(client, running.url, "key-b")
    assert again > 50  # the same tenant reuses its own prefix
    assert other == 0  # another tenant gets nothing of it
