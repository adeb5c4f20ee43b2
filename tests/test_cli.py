"""Configuration and the command line, including a real SIGTERM drain of a router process."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from trio_router import __version__
from trio_router.cli import _parser, main
from trio_router.config import HELP_GROUPS, RouterConfig, build, from_namespace, read_toml
from trio_router.errors import ConfigError


def parse(argv: list[str]) -> RouterConfig:
    return from_namespace(RouterConfig, _parser().parse_args(["serve", *argv]), section="router")


def test_defaults_are_sensible():
    config = parse([])
    assert (config.host, config.port, config.policy) == ("127.0.0.1", 30000, "least_inflight")
    assert config.max_body_size == 32 * 1024 * 1024
    assert config.problems() == []


def test_toml_fills_options_and_the_command_line_wins(tmp_path: Path):
    toml = tmp_path / "router.toml"
    toml.write_text(
        '[router]\npolicy = "sticky"\nport = 31000\nworker-urls = ["http://10.0.0.1:8000"]\n'
        "health_check_interval = 3\n"
    )
    config = parse(["--config", str(toml), "--port", "32000"])
    assert config.policy == "sticky"
    assert config.port == 32000
    assert config.worker_urls == ("http://10.0.0.1:8000",)
    assert config.health_check_interval == 3.0


def test_every_problem_in_a_config_file_is_reported_at_once(tmp_path: Path):
    toml = tmp_path / "router.toml"
    toml.write_text('polcy = "sticky"\nport = "eighty"\nhealth_check_interval = -1\n')
    with pytest.raises(ConfigError) as caught:
        build(RouterConfig, read_toml(toml))
    message = caught.value.message
    assert "unknown option 'polcy'" in message
    assert "port must be int" in message


def test_range_problems_are_reported_together():
    with pytest.raises(ConfigError) as caught:
        build(RouterConfig, {"health_check_interval": 0, "max_retries": -1, "port": 70000})
    message = caught.value.message
    assert "health_check_interval must be > 0" in message
    assert "max_retries must be >= 0" in message
    assert "port must be 0..65535" in message


def test_invalid_configuration_fails_with_one_clear_line(tmp_path: Path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("no_such_option = 1\n")
    assert main(["serve", "--config", str(toml)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "trio-router: error: invalid configuration: unknown option 'no_such_option'"


def test_a_missing_config_file_fails_with_one_clear_line(capsys):
    assert main(["serve", "--config", "/no/such/file.toml"]) == 2
    assert capsys.readouterr().err.startswith("trio-router: error: cannot read config file")


def test_a_bad_worker_url_or_middleware_fails_at_start(capsys):
    assert main(["serve", "--port", "0", "--worker-urls", "ftp://x:1"]) == 2
    assert "--worker-urls: worker url scheme must be http or https" in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--middleware-paths", "nope.Plugin"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "trio-router: error: cannot import middleware module 'nope': No module named 'nope'"
    ]


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--policy", "--health-check-interval", "--max-body-size", "--middleware-paths"):
        assert flag in text
    assert '(default: "least_inflight")' in text
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--policy", "fastest"])
    assert caught.value.code == 2


async def read_line_with(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    buffer = b""
    while marker not in buffer:
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"process ended before printing {marker!r}: {buffer!r}")
        buffer += chunk
    return buffer.split(marker, 1)[1].split(b"\n", 1)[0].strip()


BYTES = ("--tokenizer", "bytes")
QUIET = ("--graceful-timeout", "20", "--log-level", "warning")


async def test_sigterm_under_load_drains_every_stream_refuses_new_ones_and_exits_0():
    python = [sys.executable, "-m", "trio_router"]
    streams = 8
    async with trio.open_nursery() as nursery:
        worker = await nursery.start(
            partial(
                trio.run_process,
                [*python, "worker", "--port", "0", "--latency-per-token-ms", "20", *BYTES],
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        router = None
        try:
            with trio.fail_after(40):
                worker_url = (await read_line_with(worker.stdout, b"listening on ")).decode()
                router = await nursery.start(
                    partial(
                        trio.run_process,
                        [*python, "serve", "--port", "0", "--worker-urls", worker_url, *QUIET],
                        stdout=subprocess.PIPE,
                        check=False,
                    )
                )
                url = (await read_line_with(router.stdout, b"listening on ")).decode()
                received: list[list[str]] = [[] for _ in range(streams)]
                started = trio.Semaphore(0)
                body = {
                    "text": "x",
                    "stream": True,
                    "sampling_params": {"max_new_tokens": 40, "ignore_eos": True},
                }
                async with httpx.AsyncClient(timeout=30) as client:

                    async def stream(index: int) -> None:
                        async with client.stream("POST", url + "/generate", json=body) as r:
                            async for line in r.aiter_lines():
                                if line:
                                    received[index].append(line)
                                    if len(received[index]) == 1:
                                        started.release()

                    async with trio.open_nursery() as load:
                        for index in range(streams):
                            load.start_soon(stream, index)
                        for _ in range(streams):
                            await started.acquire()  # every stream is mid-flight
                        router.send_signal(signal.SIGTERM)
                    refused = False
                    for _ in range(100):
                        try:
                            async with httpx.AsyncClient(timeout=5) as fresh:
                                await fresh.get(url + "/health")
                        except httpx.TransportError:
                            refused = True
                            break
                        await trio.sleep(0.05)
                code = await router.wait()
        finally:
            if router is not None and router.returncode is None:
                router.kill()
            worker.send_signal(signal.SIGTERM)
    for events in received:
        assert events[-1] == "data: [DONE]"
        assert len(events) == 41  # every token event arrived, plus [DONE]
    assert refused
    assert code == 0


def test_range_problems_are_reported_alongside_type_errors():
    with pytest.raises(ConfigError) as caught:
        build(RouterConfig, {"port": "eighty", "health_check_interval": -1, "log_level": "loud"})
    message = caught.value.message
    assert "port must be int" in message
    assert "health_check_interval must be > 0" in message
    assert "log_level must be" in message


def test_options_outside_the_router_table_are_an_error(tmp_path: Path):
    toml = tmp_path / "router.toml"
    toml.write_text('polcy = "x"\n[router]\nport = 1\n')
    with pytest.raises(ConfigError, match=r"put every option inside \[router\]"):
        read_toml(toml, "router")


def test_help_is_in_sections_and_every_option_is_in_exactly_one():
    names = [name for group in HELP_GROUPS.values() for name in group]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(RouterConfig))
    assert len(names) == len(set(names))


def test_help_shows_the_sections_a_short_usage_and_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: trio-router serve [--config FILE] [options]\n")
    for title in ("serving:", "pool and health:", "routing:", "token cache:", "security:"):
        assert f"\n{title}\n" in out
    assert "other options:" not in out
    for option in out.split("\n  --")[1:]:
        assert " ".join(option.split()).count("(default") <= 1, option
    text = " ".join(out.split())
    assert (
        "--hf-checkpoint S directory with the tokenizer files of the token cache (default: "
        "the shipped Qwen3 tokenizer) --max-text-bytes" in text
    )
    assert '(default: "default")' in text  # --served-model-name's value, quoted


def test_a_bad_value_prints_one_line_not_the_usage(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--port", "eighty"])
    assert caught.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "trio-router serve: error: argument --port: invalid int value: 'eighty' "
        "(see trio-router serve --help)"
    ]


def test_version(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"trio-router {__version__}\n"
