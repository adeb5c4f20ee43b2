"""The operator's dashboard, rendered by a real headless Chromium against a running router."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from .conftest import start_router, start_worker

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def test_the_dashboard_is_self_contained_html(nursery, client):
    running = await start_router(nursery)
    with trio.fail_after(10):
        page = await client.get(running.url + "/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<script" in page.text
    assert "http://" not in page.text
    assert "https://" not in page.text


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
async def test_chromium_renders_workers_policy_and_traffic(nursery, client, tmp_path: Path):
    workers = [await start_worker(nursery) for _ in range(2)]
    running = await start_router(
        nursery, worker_urls=tuple(w.url for w in workers), policy="sticky"
    )
    with trio.fail_after(60):
        for key in ("a", "b", "c"):
            await client.post(
                running.url + "/generate", json={"text": key}, headers={"X-SMG-Routing-Key": key}
            )
        assert CHROMIUM is not None
        result = await trio.run_process(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                running.url + "/dashboard",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    dom = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    for worker in workers:
        assert worker.url in dom
    assert '<span id="policy">sticky</span>' in dom
    assert 'class="healthy">healthy<' in dom
    assert '<b id="healthy">2 / 2</b>' in dom
    assert "pin_new" in dom
    assert '<span id="error"></span>' in dom  # the page read /metrics without error


async def test_the_grafana_dashboard_only_uses_metrics_the_router_exports(nursery, client, qwen3):
    import re

    worker = await start_worker(nursery, tokenizer=qwen3)
    running = await start_router(
        nursery, tokenizer=qwen3, worker_urls=(worker.url,), radix_tree_max_size=1000
    )
    with trio.fail_after(20):
        await client.post(running.url + "/generate", json={"text": "hi"})
        exported = (await client.get(running.url + "/prometheus")).text
    dashboard = (Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text()
    used = set(re.findall(r"trio_router_[a-z_]+", dashboard))
    assert used
    missing = sorted(name for name in used if f"{name}" not in exported)
    assert missing == []
