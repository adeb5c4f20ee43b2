"""The chat template as requests may use it: no client-chosen template, off the event loop,
bounded (issue 16)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import trio

from trio_router.chat_template import (
    INLINE_MAX_CHARS,
    ChatTemplate,
    TemplateLimits,
    template_keywords,
)
from trio_router.errors import BadRequest, Overloaded
from trio_router.tokenizer import Tokenizer

from .test_openai import openai_router

USER = [{"role": "user", "content": "hi"}]
#: a conversation long enough to be rendered on a worker thread
LONG = [{"role": "user", "content": "x" * INLINE_MAX_CHARS}]
LOOPS = (
    "{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}"
    "<|im_start|>assistant\n"
)


def test_qwen3_templates_take_enable_thinking_and_clear_thinking_only(qwen3):
    template = ChatTemplate(qwen3, TemplateLimits())
    assert template.keywords == {"enable_thinking", "clear_thinking"}


def test_keywords_are_what_a_template_reads_and_never_sets():
    text = (
        "{{ bos_token }}{% set ns = namespace(x=1) %}{% for m in messages %}{{ m.content }}"
        "{% endfor %}{% if tools %}{{ tool_style }}{% endif %}{% set mine = 2 %}{{ mine }}"
        "{% generation %}{{ reasoning_effort }}{% endgeneration %}{{ raise_exception('x') }}"
    )
    keywords = template_keywords([text], special=["pad_token"])
    assert keywords == {"tool_style", "reasoning_effort", "enable_thinking"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chat_template": LOOPS}, "'chat_template_kwargs.chat_template' is not a keyword"),
        ({"tokenize": True}, "'chat_template_kwargs.tokenize'"),
        ({"eos_token": "x"}, "'chat_template_kwargs.eos_token'"),
        ({"continue_final_message": True}, "'chat_template_kwargs.continue_final_message'"),
        ({"anything": 1}, "allowed: clear_thinking, enable_thinking"),
        ({"enable_thinking": "no"}, "'chat_template_kwargs.enable_thinking' must be a boolean"),
        ({"clear_thinking": {"a": 1}}, "'chat_template_kwargs.clear_thinking' must be"),
        ("no", "'chat_template_kwargs' must be an object"),
    ],
)
def test_a_request_gives_only_the_template_its_own_keywords(qwen3, kwargs, message):
    template = ChatTemplate(qwen3, TemplateLimits())
    with pytest.raises(BadRequest) as caught:
        template.keyword_arguments({"chat_template_kwargs": kwargs})
    assert message in caught.value.message


def test_null_keywords_are_left_unset(qwen3):
    template = ChatTemplate(qwen3, TemplateLimits())
    body = {"chat_template_kwargs": {"enable_thinking": False, "clear_thinking": None}}
    assert template.keyword_arguments(body) == {"enable_thinking": False}
    assert template.keyword_arguments({"chat_template_kwargs": None}) == {}


async def test_a_rendering_that_takes_too_long_is_a_503_and_keeps_its_thread(qwen3):
    template = ChatTemplate(qwen3, TemplateLimits(timeout=0.05), limiter=1)
    release = threading.Event()
    try:
        with trio.fail_after(10):
            with pytest.raises(Overloaded) as caught:
                await template.run(lambda: release.wait(10), LONG, None)
            # the abandoned thread still holds the only slot: the next rendering waits, then
            # gives up in its own time, instead of starting a second thread
            assert template.limiter.borrowed_tokens == 1
            with pytest.raises(Overloaded):
                await template.run(lambda: "never runs", LONG, None)
    finally:
        release.set()
    assert caught.value.status == 503
    assert "--chat-template-timeout" in caught.value.message


async def test_a_client_template_is_refused_and_never_rendered(nursery, client, qwen3):
    worker, running = await openai_router(nursery, qwen3)
    with trio.fail_after(10):
        chat = await client.post(
            running.url + "/v1/chat/completions",
            json={
                "messages": USER,
                "max_tokens": 2,
                "chat_template_kwargs": {"chat_template": LOOPS},
            },
        )
        sid = (await client.post(running.url + "/sessions")).json()["session_id"]
        turn = await client.post(
            f"{running.url}/sessions/{sid}/v1/chat/completions",
            json={
                "messages": USER,
                "max_tokens": 2,
                "chat_template_kwargs": {"chat_template": "{{ 'a' * 100000 }}"},
            },
        )
        state = (await client.get(f"{running.url}/sessions/{sid}")).json()
    for response in (chat, turn):
        assert response.status_code == 400
        assert "'chat_template_kwargs.chat_template'" in response.json()["error"]["message"]
    assert worker.app.stats.requests.get("/generate", 0) == 0
    assert state["records"] == []


async def test_enable_thinking_still_reaches_the_template(nursery, client, qwen3):
    _worker, running = await openai_router(nursery, qwen3)
    body = {"messages": USER, "max_tokens": 2, "chat_template_kwargs": {"enable_thinking": False}}
    with trio.fail_after(10):
        r = await client.post(running.url + "/v1/chat/completions", json=body)
        assert r.status_code == 200
        text = qwen3.apply_chat_template(USER, enable_thinking=False)
        got = await client.post(running.url + "/retrieve_from_text", json={"text": text})
    assert text.endswith("<think>\n\n</think>\n\n")
    assert got.json()["tokens"][: len(qwen3.encode(text))] == qwen3.encode(text)


class WatchedTemplate(Tokenizer):
    """The Qwen3 tokenizer, noting the thread that renders; when ``gated``, its template
    waits for the test (at most 5 s) before it renders."""

    def __init__(self, qwen3: Tokenizer, *, gated: bool = True) -> None:
        super().__init__(qwen3.hf)
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.rendering = threading.Event()
        self.order: list[str] = []
        self.threads: list[str] = []

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        main = threading.current_thread() is threading.main_thread()
        self.threads.append("trio" if main else "worker")
        self.rendering.set()
        self.gate.wait(5)
        self.order.append("rendered")
        return super().apply_chat_template(messages, tools, add_generation_prompt, **kwargs)


@pytest.mark.parametrize("where", ["chat", "session"])
async def test_health_is_answered_while_a_template_renders(nursery, client, qwen3, where):
    gated = WatchedTemplate(qwen3)
    _worker, running = await openai_router(nursery, gated)
    url = running.url + "/v1/chat/completions"
    if where == "session":
        sid = (await client.post(running.url + "/sessions")).json()["session_id"]
        url = f"{running.url}/sessions/{sid}/v1/chat/completions"
    answers: list[int] = []

    async def chat() -> None:
        r = await client.post(url, json={"messages": LONG, "max_tokens": 2})
        answers.append(r.status_code)

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as inner:
                inner.start_soon(chat)
                await trio.to_thread.run_sync(gated.rendering.wait)
                health = await client.get(running.url + "/health")
                gated.order.append("health answered")
                gated.gate.set()
    finally:
        gated.gate.set()
    # on the event loop the rendering would block /health until it ends (5 s here)
    assert health.status_code == 200
    assert gated.order[:2] == ["health answered", "rendered"]
    assert answers == [200]


async def test_the_timeout_answers_while_a_slow_rendering_goes_on(nursery, client, qwen3):
    gated = WatchedTemplate(qwen3)
    _worker, running = await openai_router(nursery, gated, chat_template_timeout=0.2)
    try:
        with trio.fail_after(20):
            r = await client.post(
                running.url + "/v1/chat/completions", json={"messages": LONG, "max_tokens": 2}
            )
    finally:
        gated.gate.set()
    assert r.status_code == 503
    assert "took longer than 0.2 s" in r.json()["error"]["message"]


async def test_prompts_and_message_counts_are_bounded(nursery, client, qwen3):
    worker, running = await openai_router(nursery, qwen3, max_prompt_chars=300, max_chat_messages=4)
    chat = running.url + "/v1/chat/completions"
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    cases = [
        # the text alone is too long: refused before rendering
        ({"messages": [{"role": "user", "content": "x" * 301}]}, 413, "messages hold 301"),
        # the text fits, the rendered prompt (with the template's markers) does not
        ({"messages": [{"role": "user", "content": "x" * 280}]}, 413, "rendered prompt has"),
        ({"messages": USER * 5}, 400, "more than 4 messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 4}]},
            400,
            "more than 4 messages, content parts and tool calls",
        ),
        ({"messages": USER, "tools": [tool] * 5}, 400, "'tools' has 5 tools; the limit is 4"),
    ]
    with trio.fail_after(20):
        for body, status, message in cases:
            r = await client.post(chat, json={**body, "max_tokens": 2})
            assert r.status_code == status, (body, r.text)
            assert message in r.json()["error"]["message"]
        ok = await client.post(chat, json={"messages": USER * 4, "max_tokens": 2})
    assert ok.status_code == 200
    assert worker.app.stats.requests.get("/generate", 0) == 1


async def test_only_tiny_conversations_render_on_the_event_loop(nursery, client, qwen3):
    noting = WatchedTemplate(qwen3, gated=False)
    _worker, running = await openai_router(nursery, noting)
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}
    cases = {
        "tiny": {"messages": USER},
        "long": {"messages": LONG},
        "many": {"messages": USER * 5},
        "tools": {"messages": USER, "tools": [tool]},
        "tool calls": {"messages": [*USER, call, *USER]},
    }
    threads = {}
    with trio.fail_after(20):
        for name, body in cases.items():
            r = await client.post(
                running.url + "/v1/chat/completions", json={**body, "max_tokens": 2}
            )
            assert r.status_code in (200, 400), r.text  # the tool case may be refused by the worker
            threads[name] = noting.threads.pop()
    assert threads == {
        "tiny": "trio",  # a fraction of a millisecond: cheaper than a trip through a thread
        "long": "worker",
        "many": "worker",
        "tools": "worker",
        "tool calls": "worker",
    }
