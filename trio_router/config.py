"""Configuration: frozen dataclasses, filled from defaults < TOML file < command line.

Each field's metadata carries its ``--help`` text, so the dataclass is the single
place an option is declared. Unknown TOML keys and out-of-range values are
errors that list every problem at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .policies import POLICY_NAMES

MiB = 1024 * 1024
UPSTREAM_CLIENTS = ("lean", "httpcore")


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its command-line help text."""
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterConfig:
    """Everything ``trio-router serve`` can be told."""

    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(30000, "port to listen on (0 picks a free one)")
    worker_urls: tuple[str, ...] = option((), "SGLang worker URLs to start with", nargs="*")
    policy: str = option(
        "least_inflight", "routing policy (manual is an alias of sticky)", choices=POLICY_NAMES
    )
    health_check_interval: float = option(10.0, "seconds between health probes of each worker")
    health_check_timeout: float = option(
        10.0,
        "seconds before one health probe counts as failed (SGLang's /health runs a one-token "
        "generation and takes 1 s at least)",
    )
    health_check_failure_threshold: int = option(3, "consecutive failures that quarantine a worker")
    health_check_success_threshold: int = option(
        2, "consecutive probe successes that re-admit a quarantined worker"
    )
    health_check_endpoint: str = option("/health", "worker path probed for health")
    wait_for_workers: float = option(
        0.0,
        "seconds to wait at start for a worker to be healthy before serving; if none is by "
        "then, exit with status 2 (0 = serve at once)",
    )
    quarantine_hold: float = option(
        10.0,
        "seconds a worker quarantined again with no successful request since its last "
        "re-admission is held out before probes may re-admit it; doubles each time",
    )
    quarantine_max_hold: float = option(300.0, "longest such hold, in seconds")
    max_retries: int = option(
        2,
        "extra attempts on another worker for a request that could not be sent, "
        "or (--resend-unanswered) was dropped unanswered",
    )
    resend_unanswered: bool = option(
        False,
        "also send an inference request to another worker (within --max-retries) when its "
        "worker read it and broke the connection before answering, as a crashed worker does",
    )
    request_timeout: float = option(
        3600.0, "total seconds one proxied request may take, streaming included (0 = no limit)"
    )
    connect_timeout: float = option(5.0, "seconds to open a connection to a worker")
    first_byte_timeout: float = option(
        0.0,
        "seconds a worker may take to begin its answer (its response head) before the "
        "request fails with 504 and counts against it (0 = no limit; a non-streamed "
        "generation answers only when it is done)",
    )
    max_connections: int = option(1024, "upstream connections kept open to all workers together")
    keepalive_expiry: float = option(
        4.0, "seconds an idle upstream connection is kept (below SGLang's 5 s keep-alive)"
    )
    upstream_client: str = option(
        "lean",
        "data-plane HTTP client: lean (our own) or httpcore",
        choices=UPSTREAM_CLIENTS,
    )
    max_body_size: int = option(32 * MiB, "largest request body accepted, in bytes (413 beyond)")
    graceful_timeout: float = option(
        30.0, "seconds in-flight requests get to finish on SIGTERM/SIGINT"
    )
    keep_alive_timeout: float = option(
        75.0, "seconds an idle client connection is kept open (above common LB idle timeouts)"
    )
    header_timeout: float = option(
        10.0, "seconds a client has to send a request head once it began (408 beyond; 0 = none)"
    )
    body_timeout: float = option(
        60.0,
        "seconds a client has to send a request body after its head (408 beyond; 0 = none); "
        "a 32 MiB body needs 4.5 Mbit/s",
    )
    max_client_connections: int = option(
        0,
        "client connections open at once; beyond it the one waiting longest on its client "
        "is closed (0 = as many as the file limit allows, at most 10000)",
    )
    sticky_ttl: float = option(3600.0, "seconds an idle routing key stays pinned (sticky)")
    sticky_spill_factor: float = option(
        1.5, "a worker takes new pins only below this multiple of the mean pin count (sticky)"
    )
    hash_load_factor: float = option(
        1.25, "bounded load of consistent_hash: multiple of the mean in-flight count"
    )
    radix_tree_max_size: int = option(
        0, "token budget of the token cache (0 = off); turns on token-exact /generate"
    )
    max_text_bytes: int = option(
        8 * MiB,
        "largest text the router tokenizes in one request (/generate text, "
        "/retrieve_from_text, prompts), in UTF-8 bytes (413 beyond)",
    )
    hf_checkpoint: str | None = option(
        None,
        "directory with the tokenizer files of the token cache (default: the shipped Qwen3 "
        "tokenizer)",
    )
    gc_threshold_k: int = option(5, "token cache keeps the newest k weight versions")
    cache_gc_interval: float = option(30.0, "seconds between token cache GC passes")
    namespace_header: str = option(
        "x-trio-router-namespace", "header naming a tenant namespace of cached trajectories"
    )
    served_model_name: str = option(
        "default", "model name of the OpenAI API (/v1/models, responses)"
    )
    max_prompt_chars: int = option(
        8 * MiB, "characters of a prompt rendered by the chat template (413 beyond)"
    )
    max_chat_messages: int = option(
        10_000,
        "messages of one chat request, their content parts and tool calls counted together; "
        "also its tools (400 beyond)",
    )
    chat_template_timeout: float = option(
        10.0, "seconds one chat template rendering may take, waiting for a thread included (503)"
    )
    balance_abs_threshold: int = option(
        32, "cache_aware: in-flight difference between workers that counts as imbalanced"
    )
    balance_rel_threshold: float = option(
        1.5, "cache_aware: and the busiest over the idlest must exceed this ratio"
    )
    cache_threshold: float = option(
        0.5, "cache_aware: share of the prompt that must be cached to follow its worker"
    )
    session_ttl: float = option(3600.0, "seconds an idle agent session is kept")
    max_sessions: int = option(10_000, "agent sessions open at once (429 beyond)")
    session_max_tokens: int = option(
        50_000_000, "tokens all sessions together may hold (429 beyond)"
    )
    session_auth: bool = option(
        False, "sessions answer only requests carrying the X-Session-Token they were given"
    )
    strip_routed_experts: bool = option(
        False, "keep R3 routed_experts with session samples but leave them out of replies"
    )
    abort_retries: int = option(
        0, "continue a /generate that SGLang aborted, up to this many times (0 = return it)"
    )
    abort_retry_backoff: float = option(0.5, "seconds to wait before continuing an aborted one")
    admin_token: str | None = option(
        None,
        "token admin endpoints require (Authorization: Bearer); also TRIO_ROUTER_ADMIN_TOKEN. "
        "Unset: admin endpoints answer loopback clients only",
    )
    insecure_admin: bool = option(False, "with no admin token, let any client administer")
    api_key: tuple[str, ...] = option(
        (),
        "keys inference calls must carry (Authorization: Bearer), each its own tenant; "
        "also TRIO_ROUTER_API_KEY",
        nargs="*",
    )
    worker_api_key: str | None = option(
        None,
        "key sent to every worker (Authorization: Bearer; SGLang's --api-key) in place of "
        "the client's; also TRIO_ROUTER_WORKER_API_KEY",
    )
    worker_allow: tuple[str, ...] = option(
        ("loopback", "private"),
        "hosts workers may live on: loopback, private, any, a CIDR, a host or *.domain, "
        "each optionally :PORT",
        nargs="*",
    )
    proxy_allow: tuple[str, ...] = option(
        (), "extra worker paths to relay (exact, or a prefix ending in /)", nargs="*"
    )
    max_concurrent_requests: int = option(
        0, "requests handled at once; beyond it 503 with Retry-After (0 = no limit)"
    )
    max_header_size: int = option(65536, "largest request head, in bytes (431 beyond)")
    prometheus_port: int | None = option(
        None, "also serve Prometheus metrics at /metrics on this port (always at /prometheus)"
    )
    prometheus_host: str = option("127.0.0.1", "address of the Prometheus listener")
    middleware_paths: tuple[str, ...] = option(
        (), "dotted paths of middleware classes, applied in order", nargs="*"
    )
    seed: int | None = option(None, "seed for the policies' tie-breaking (reproducible runs)")
    log_level: str = option("info", "log level", choices=("debug", "info", "warning", "error"))
    verbose: bool = option(False, "log one line per request")
    echo_request_id: bool = option(
        True,
        "put the request's X-Request-ID (the client's, or the one the router gave it and sent "
        "to the worker) on every answer, in place of a worker's own",
    )

    def problems(self) -> list[str]:
        found = []
        if not 0 <= self.port <= 65535:
            found.append(f"port must be 0..65535, not {self.port}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            found.append(f"log_level must be debug, info, warning or error, not {self.log_level!r}")
        if self.policy not in POLICY_NAMES:
            found.append(f"policy must be one of {', '.join(POLICY_NAMES)}, not {self.policy!r}")
        if self.upstream_client not in UPSTREAM_CLIENTS:
            found.append(f"upstream_client must be lean or httpcore, not {self.upstream_client!r}")
        for name in (
            "health_check_interval",
            "health_check_timeout",
            "connect_timeout",
            "sticky_ttl",
            "keep_alive_timeout",
        ):
            if getattr(self, name) <= 0:
                found.append(f"{name} must be > 0")
        for name in (
            "request_timeout",
            "graceful_timeout",
            "keepalive_expiry",
            "first_byte_timeout",
            "quarantine_hold",
            "wait_for_workers",
            "header_timeout",
            "body_timeout",
            "max_client_connections",
        ):
            if getattr(self, name) < 0:
                found.append(f"{name} must be >= 0")
        for name in (
            "health_check_failure_threshold",
            "health_check_success_threshold",
            "max_connections",
            "max_body_size",
            "max_text_bytes",
        ):
            if getattr(self, name) < 1:
                found.append(f"{name} must be >= 1")
        if self.radix_tree_max_size < 0:
            found.append("radix_tree_max_size must be >= 0")
        if self.gc_threshold_k < 1:
            found.append("gc_threshold_k must be >= 1")
        if self.cache_gc_interval <= 0:
            found.append("cache_gc_interval must be > 0")
        if self.max_prompt_chars < 1 or self.max_chat_messages < 1:
            found.append("max_prompt_chars and max_chat_messages must be >= 1")
        if self.chat_template_timeout <= 0:
            found.append("chat_template_timeout must be > 0")
        if self.policy == "cache_aware" and self.radix_tree_max_size == 0:
            found.append("policy cache_aware needs the token cache (--radix-tree-max-size)")
        if self.session_ttl <= 0 or self.max_sessions < 1 or self.session_max_tokens < 1:
            found.append("session_ttl, max_sessions and session_max_tokens must be positive")
        if not 0 <= self.cache_threshold <= 1:
            found.append("cache_threshold must be within 0..1")
        if self.abort_retries < 0 or self.abort_retry_backoff < 0:
            found.append("abort_retries and abort_retry_backoff must be >= 0")
        if self.max_concurrent_requests < 0 or self.max_header_size < 1024:
            found.append("max_concurrent_requests must be >= 0 and max_header_size >= 1024")
        if self.admin_token is not None and len(self.admin_token) < 8:
            found.append("admin_token must be at least 8 characters")
        if self.quarantine_max_hold < self.quarantine_hold:
            found.append("quarantine_max_hold must be >= quarantine_hold")
        if self.worker_api_key is not None and not self.worker_api_key.strip():
            found.append("worker_api_key must not be empty")
        if self.max_retries < 0:
            found.append("max_retries must be >= 0")
        if self.sticky_spill_factor < 1 or self.hash_load_factor < 1:
            found.append("sticky_spill_factor and hash_load_factor must be >= 1")
        if self.wait_for_workers > 0 and not self.worker_urls:
            found.append("wait_for_workers needs worker_urls to wait for")
        if not self.health_check_endpoint.startswith("/"):
            found.append("health_check_endpoint must start with /")
        if self.prometheus_port is not None and not 0 <= self.prometheus_port <= 65535:
            found.append(f"prometheus_port must be 0..65535, not {self.prometheus_port}")
        if self.prometheus_port == self.port != 0 and self.prometheus_host == self.host:
            found.append(f"prometheus_port must differ from port ({self.port})")
        return found


#: ``trio-router serve --help`` in sections: each option of RouterConfig in one of them
HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "serving": (
        "host",
        "port",
        "graceful_timeout",
        "keep_alive_timeout",
        "request_timeout",
        "first_byte_timeout",
        "connect_timeout",
        "max_retries",
        "resend_unanswered",
        "max_connections",
        "keepalive_expiry",
        "upstream_client",
        "middleware_paths",
    ),
    "pool and health": (
        "worker_urls",
        "wait_for_workers",
        "health_check_interval",
        "health_check_timeout",
        "health_check_failure_threshold",
        "health_check_success_threshold",
        "health_check_endpoint",
        "quarantine_hold",
        "quarantine_max_hold",
    ),
    "routing": (
        "policy",
        "sticky_ttl",
        "sticky_spill_factor",
        "hash_load_factor",
        "balance_abs_threshold",
        "balance_rel_threshold",
        "cache_threshold",
        "seed",
    ),
    "token cache": (
        "radix_tree_max_size",
        "hf_checkpoint",
        "max_text_bytes",
        "gc_threshold_k",
        "cache_gc_interval",
        "namespace_header",
        "abort_retries",
        "abort_retry_backoff",
    ),
    "OpenAI API and sessions (with the token cache)": (
        "served_model_name",
        "max_prompt_chars",
        "max_chat_messages",
        "chat_template_timeout",
        "session_ttl",
        "max_sessions",
        "session_max_tokens",
        "session_auth",
        "strip_routed_experts",
    ),
    "security": (
        "admin_token",
        "insecure_admin",
        "api_key",
        "worker_api_key",
        "worker_allow",
        "proxy_allow",
    ),
    "limits": (
        "max_body_size",
        "max_header_size",
        "header_timeout",
        "body_timeout",
        "max_client_connections",
        "max_concurrent_requests",
    ),
    "observability": (
        "log_level",
        "verbose",
        "echo_request_id",
        "prometheus_port",
        "prometheus_host",
    ),
}

C = TypeVar("C")


def _field_kind(hint: Any) -> tuple[type, bool, bool]:
    """(scalar type, is a tuple of them, may be None) for a field's type hint."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = True
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type[Any],
    groups: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """One ``--flag`` per dataclass field, in ``groups`` (title: field names) if given;
    defaults stay unset so TOML can fill them."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    sections: list[tuple[Any, list[str]]] = []
    if groups:
        for title, names in groups.items():
            sections.append((parser.add_argument_group(title), list(names)))
    listed = {name for _, names in sections for name in names}
    rest = [name for name in by_name if name not in listed]
    if rest:
        sections.append((parser.add_argument_group("other options") if groups else parser, rest))
    for target, names in sections:
        for name in names:
            _add_flag(target, by_name[name], hints[name])


def _add_flag(target: Any, f: dataclasses.Field[Any], hint: Any) -> None:
    scalar, many, _ = _field_kind(hint)
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else None
    help_text = meta.get("help", "")
    if default is not None and "(default" not in help_text:  # unset: the help says what then
        help_text += f" (default: {_show(default)})"
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    if scalar is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = scalar
        kwargs["metavar"] = "N" if scalar is int else "X" if scalar is float or many else "S"
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
            del kwargs["metavar"]  # argparse shows them
        if many:
            kwargs["nargs"] = meta.get("nargs", "+")
    target.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    if isinstance(value, str):
        return f'"{value}"'  # (default: "default") is the name, not the word
    return str(value)


def build(cls: type[C], *layers: Mapping[str, Any]) -> C:
    """Merge ``layers`` (later wins) over the defaults of ``cls``, checking every key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    problems: list[str] = []
    for layer in layers:
        for raw_key, value in layer.items():
            key = raw_key.replace("-", "_")
            if key not in names:
                problems.append(f"unknown option {raw_key!r}")
                continue
            try:
                values[key] = _coerce(key, value, hints[key])
            except ConfigError as exc:
                problems.append(exc.message)
    config = cls(**values)  # the values that passed, so range checks still run
    check = getattr(config, "problems", None)
    if check is not None:
        problems.extend(check())
    if not problems:
        return config
    raise ConfigError("invalid configuration: " + "; ".join(problems))


def _coerce(key: str, value: Any, hint: Any) -> Any:
    scalar, many, optional = _field_kind(hint)
    if value is None and optional:
        return None
    if many:
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, Sequence) or isinstance(value, bytes):
            raise ConfigError(f"{key} must be a list")
        return tuple(_coerce_scalar(key, item, scalar) for item in value)
    return _coerce_scalar(key, value, scalar)


def _coerce_scalar(key: str, value: Any, scalar: type) -> Any:
    if scalar is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if scalar is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    if scalar is int and isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, not {value!r}")
    if not isinstance(value, scalar):
        raise ConfigError(f"{key} must be {scalar.__name__}, not {value!r}")
    return value


def read_toml(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """The options in a TOML file (optionally one ``[section]`` of it)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if section is not None and isinstance(data.get(section), dict):
        others = sorted(k for k in data if k != section)
        if others:
            raise ConfigError(
                f"config file {path}: put every option inside [{section}] "
                f"(found {', '.join(others)} outside it)"
            )
        return dict(data[section])
    return data


def from_namespace(cls: type[C], args: argparse.Namespace, section: str | None = None) -> C:
    """Build ``cls`` from parsed arguments, reading ``--config`` first when given."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    toml: dict[str, Any] = {}
    if getattr(args, "config", None):
        toml = read_toml(args.config, section)
    return build(cls, toml, given)
