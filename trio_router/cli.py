"""The ``trio-router`` command: ``serve``, ``worker`` and ``demo``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Sequence
from dataclasses import fields
from functools import partial

import trio

from . import __version__
from .config import HELP_GROUPS, RouterConfig, add_arguments, build, from_namespace
from .errors import ConfigError
from .server import (
    RunningRouter,
    bind_failure,
    cannot_listen,
    find_exception,
    run_until_signalled,
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is ``--help``'s)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trio-router",
        description="A token-exact HTTP router for SGLang workers in RL rollouts.",
    )
    parser.add_argument("--version", action="version", version=f"trio-router {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the router in front of SGLang workers",
        usage="trio-router serve [--config FILE] [options]",
        description="Run the router. Every option may also come from --config (TOML), "
        "top level or a [router] table; command-line flags win. "
        "docs/configuration.md describes each one.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML file with options")
    add_arguments(serve, RouterConfig, HELP_GROUPS)

    from .sim.worker import SimWorkerConfig

    worker = commands.add_parser(
        "worker",
        help="run a simulated SGLang worker (no GPU needed)",
        usage="trio-router worker [--config FILE] [options]",
        description="Run a simulated SGLang worker for demos, tests and benchmarks. "
        "Options may also come from --config (TOML, top level or a [worker] table).",
    )
    worker.add_argument("--config", metavar="FILE", help="TOML file with options")
    add_arguments(worker, SimWorkerConfig)

    demo = commands.add_parser(
        "demo",
        help="run two simulated workers and a router, drive a short rollout, print a summary",
    )
    demo.add_argument(
        "--serve", action="store_true", help="keep everything running and print the URLs"
    )
    demo.add_argument("--agents", type=int, default=6, help="concurrent agents (default: 6)")
    demo.add_argument("--turns", type=int, default=3, help="turns per agent (default: 3)")
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise


def _announce(running: RunningRouter) -> None:
    config = running.router.config
    if config.admin_token is None and config.insecure_admin:
        logging.getLogger("trio_router").warning(
            "--insecure-admin: any client that reaches this port may add workers and "
            "broadcast worker-control calls"
        )
    print(f"trio-router listening on {running.url}", flush=True)
    if running.prometheus_url:
        print(f"prometheus metrics on {running.prometheus_url}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            config = from_namespace(RouterConfig, args, section="router")
            config = _secrets_from_environment(config)
            _setup_logging(config.log_level)
            trio.run(partial(run_until_signalled, config, _announce))
        elif args.command == "worker":
            from .sim.worker import SimWorkerConfig, run_sim_worker_until_signalled

            worker_config = from_namespace(SimWorkerConfig, args, section="worker")
            _setup_logging("info")
            try:
                trio.run(run_sim_worker_until_signalled, worker_config)
            except (OSError, BaseExceptionGroup) as exc:
                failure = bind_failure(exc)
                if failure is None:
                    raise
                host = (
                    f"[{worker_config.host}]" if ":" in worker_config.host else worker_config.host
                )
                raise cannot_listen(f"{host}:{worker_config.port}", "--port", failure) from None
        else:
            from .demo import run_demo

            _setup_logging("warning")
            return trio.run(
                partial(run_demo, agents=args.agents, turns=args.turns, serve_forever=args.serve)
            )
    except (ConfigError, BaseExceptionGroup) as exc:
        problem = _config_error(exc)
        if problem is None:
            raise
        print(f"trio-router: error: {problem.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _secrets_from_environment(config: RouterConfig) -> RouterConfig:
    """Tokens may come from the environment, so they stay off command lines."""
    changes: dict[str, object] = {}
    if config.admin_token is None and os.environ.get("TRIO_ROUTER_ADMIN_TOKEN"):
        changes["admin_token"] = os.environ["TRIO_ROUTER_ADMIN_TOKEN"]
    if config.worker_api_key is None and os.environ.get("TRIO_ROUTER_WORKER_API_KEY"):
        changes["worker_api_key"] = os.environ["TRIO_ROUTER_WORKER_API_KEY"]
    if not config.api_key and os.environ.get("TRIO_ROUTER_API_KEY"):
        changes["api_key"] = tuple(os.environ["TRIO_ROUTER_API_KEY"].split(","))
    if not changes:
        return config
    return build(RouterConfig, {f.name: getattr(config, f.name) for f in fields(config)}, changes)


def _config_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError behind ``exc``, also when nurseries wrapped it in groups."""
    found = find_exception(exc, lambda e: isinstance(e, ConfigError))
    return found if isinstance(found, ConfigError) else None


if __name__ == "__main__":
    sys.exit(main())
