"""X-Request-ID on every answer, and the worker behind answers the router builds itself.

Every answer carries exactly one X-Request-ID, the client's (or one the router gave the
request, which the worker received too), whoever built the answer: a worker, the token
cache, the OpenAI front end, sessions, the control plane, an error document. Answers built
from a worker's (OpenAI, sessions, a continued /generate) name that worker in the access
log and the metrics, with the bytes sent, and go through ``on_response_start``.
"""

from __future__ import annotations

import logging

import httpx
import pytest
import trio

from .conftest import start_router, start_scripted
from .scripted import Script
from .test_proxy import wait_until
from .test_token_cache import cached_router

PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ID = {"x-request-id": "rollout-7-turn-2"}
STAMP = "trio_router.middleware_examples.StampWorker"


def request_ids(response: httpx.Response) -> list[str]:
    return response.headers.get_list("x-request-id")


async def test_every_answer_the_router_builds_carries_the_request_id(nursery, client, qwen3):
    _, running = await cached_router(nursery, qwen3, abort_retries=1)
    url = running.url
    with trio.fail_after(30):
        answers = {
            "generate (continued aborts)": await client.post(
                url + "/generate", json={"text": PROMPT}, headers=ID
            ),
            "chat": await client.post(url + "/v1/chat/completions", json=CHAT, headers=ID),
            "completions": await client.post(
                url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=ID
            ),
            "session": await client.post(url + "/sessions", json={}, headers=ID),
            "retrieve": await client.post(
                url + "/retrieve_from_text", json={"text": PROMPT}, headers=ID
            ),
            "error document": await client.post(url + "/v1/chat/completions", headers=ID),
            "control-plane error": await client.delete(url + "/workers/nope", headers=ID),
            "router health": await client.get(url + "/health", headers=ID),
            "refused path": await client.post(url + "/no_such_path", headers=ID),
        }
        sid = answers["session"].json()["session_id"]
        answers["session turn"] = await client.post(
            f"{url}/sessions/{sid}/v1/chat/completions", json=CHAT, headers=ID
        )
        async with client.stream(
            "POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=ID
        ) as streamed:
            await streamed.aread()
        answers["chat stream"] = streamed
    statuses = {name: r.status_code for name, r in answers.items()}
    assert statuses == {
        "generate (continued aborts)": 200,
        "chat": 200,
        "completions": 200,
        "session": 200,
        "retrieve": 200,
        "error document": 400,
        "control-plane error": 400,
        "router health": 200,
        "refused path": 403,
        "session turn": 200,
        "chat stream": 200,
    }
    for name, response in answers.items():
        assert request_ids(response) == ["rollout-7-turn-2"], name


async def test_a_request_without_an_id_gets_one_that_the_worker_and_the_client_see(nursery, client):
    upstream, upstream_url = await start_scripted(nursery)
    running = await start_router(nursery, worker_urls=(upstream_url,))
    with trio.fail_after(10):
        relayed = await client.post(running.url + "/generate", json={"text": "x"})
        refused = await client.get(running.url + "/workers/unknown-path/x")
    sent = [v for k, v in upstream.seen[-1].headers if k == b"x-request-id"]
    assert len(sent) == 1
    assert request_ids(relayed) == [sent[0].decode()]
    assert sent[0].startswith(b"tr-")
    (other,) = request_ids(refused)
    assert other.startswith("tr-")
    assert other != sent[0].decode()


async def test_a_workers_own_request_id_is_replaced_by_ours(nursery, client):
    upstream, upstream_url = await start_scripted(nursery)
    upstream.script = Script(
        headers=[(b"content-type", b"application/json"), (b"X-Request-ID", b"sglang-abc")]
    )
    running = await start_router(nursery, worker_urls=(upstream_url,))
    with trio.fail_after(10):
        response = await client.post(running.url + "/generate", json={"text": "x"}, headers=ID)
    assert request_ids(response) == ["rollout-7-turn-2"]


async def test_without_echo_the_router_adds_no_request_id(nursery, client):
    upstream, upstream_url = await start_scripted(nursery)
    upstream.script = Script(headers=[(b"x-request-id", b"sglang-abc")])
    running = await start_router(nursery, worker_urls=(upstream_url,), echo_request_id=False)
    with trio.fail_after(10):
        relayed = await client.post(running.url + "/generate", json={"text": "x"}, headers=ID)
        health = await client.get(running.url + "/health", headers=ID)
    assert request_ids(relayed) == ["sglang-abc"]  # the worker's, as it sent it
    assert request_ids(health) == []
    assert [v for k, v in upstream.seen[-1].headers if k == b"x-request-id"] == [
        b"rollout-7-turn-2"
    ]


def access_lines(caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    """The access log's lines by path."""
    lines = {}
    for record in caplog.records:
        if record.name == "trio_router.access":
            message = record.getMessage()
            path = message.split(" path=", 1)[1].split(" ", 1)[0]
            lines[path] = message
    return lines


async def test_openai_session_and_continued_answers_name_their_worker_and_bytes(
    nursery, client, qwen3, caplog
):
    worker, running = await cached_router(nursery, qwen3, abort_retries=1, verbose=True)
    url = running.url
    with caplog.at_level(logging.INFO, logger="trio_router.access"), trio.fail_after(30):
        chat = await client.post(url + "/v1/chat/completions", json=CHAT)
        generated = await client.post(url + "/generate", json={"text": PROMPT})
        sid = (await client.post(url + "/sessions", json={})).json()["session_id"]
        turn = await client.post(f"{url}/sessions/{sid}/v1/chat/completions", json=CHAT)
        async with client.stream(
            "POST", url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True}
        ) as streamed:
            streamed_bytes = len(await streamed.aread())
        await wait_until(lambda: "/v1/completions" in access_lines(caplog))  # logged at its end
    lines = access_lines(caplog)
    for path, response in (
        ("/v1/chat/completions", chat),
        ("/generate", generated),
        (f"/sessions/{sid}/v1/chat/completions", turn),
    ):
        assert f" worker={worker.url} " in lines[path], lines[path]
        assert f" bytes={len(response.content)} " in lines[path], lines[path]
    assert f" worker={worker.url} " in lines["/v1/completions"]
    assert f" bytes={streamed_bytes} " in lines["/v1/completions"]
    metrics = running.router.metrics.render().decode()
    for path in ("/v1/chat/completions", "/v1/completions", "/generate"):
        assert f'path="{path}",status="200",worker="{worker.url}"' in metrics, path


async def test_middleware_stamps_a_continued_generate_like_a_relayed_one(nursery, client, qwen3):
    worker, running = await cached_router(
        nursery, qwen3, abort_retries=1, middleware_paths=(STAMP,)
    )
    with trio.fail_after(30):
        continued = await client.post(running.url + "/generate", json={"text": PROMPT})
        chat = await client.post(running.url + "/v1/chat/completions", json=CHAT)
    assert continued.status_code == 200
    assert "continued_aborts" in continued.json()["meta_info"]  # the router built it
    assert continued.headers.get_list("x-trio-router-worker") == [worker.url]
    assert chat.headers.get_list("x-trio-router-worker") == [worker.url]
