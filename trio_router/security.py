"""Security by default: who may administer, which workers may join, which paths are relayed.

- Admin actions (registering workers, worker-control broadcasts) need the admin
  token when one is set, from every client; with none set only loopback
  clients may administer (``--insecure-admin`` opens them to all).
- A worker URL must be http(s) and its host must pass the allow-list
  (loopback and private networks by default). Link-local and cloud metadata
  addresses are always refused, also as IPv4-mapped IPv6 or behind a name.
- Only inference and read-only paths are relayed to a worker; worker-control
  paths are admin-only broadcasts; anything else is refused.
- With API keys set, every data-plane call needs one, and each key is its own
  tenant: cached trajectories and sessions are scoped by it.

Pure except ``resolve_host`` (which asks the resolver through trio).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio

from .errors import BadRequest, ConfigError, Forbidden, Unauthorized

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Never a worker: cloud metadata services and link-local addresses.
DENIED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # link-local, incl. 169.254.169.254 (AWS, GCP, Azure metadata)
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "0.0.0.0/8",
        "::/128",
        "224.0.0.0/4",  # multicast
        "ff00::/8",
        "255.255.255.255/32",
    )
)
DENIED_NAMES = frozenset({"metadata.google.internal", "metadata", "instance-data"})
PRIVATE_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)

#: Paths relayed to one worker by default (exact, or a prefix ending in "/"): the
#: inference and read-only routes SGLang 0.5.23 serves (its ``http_server.py``). Stored
#: state (``/v1/files``, ``/v1/batches``, ``/v1/responses/<id>``) is never relayed: the
#: router cannot tell whose it is.
DEFAULT_RELAYED = (
    "/generate",
    "/health",
    "/health_generate",
    "/get_model_info",
    "/get_server_info",
    "/model_info",
    "/server_info",
    "/tokenize",
    "/detokenize",
    "/encode",
    "/classify",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/models/",
    "/v1/embeddings",
    "/v1/classify",
    "/v1/rerank",
    "/v1/score",
    "/v1/tokenize",
    "/v1/detokenize",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/loads",
)
#: Worker-control paths: admin only, sent to every worker.
BROADCAST_PATHS = frozenset(
    {
        "/abort_request",
        "/flush_cache",
        "/pause_generation",
        "/continue_generation",
        "/update_weights_from_disk",
        "/update_weights_from_tensor",
        "/update_weights_from_distributed",
        "/update_weight_version",
        "/init_weights_update_group",
        "/destroy_weights_update_group",
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/start_profile",
        "/stop_profile",
    }
)


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(client: str | None) -> bool:
    if not client:
        return False
    try:
        return _unmapped(ipaddress.ip_address(client)).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One ``--worker-allow`` entry: a network or a host name pattern, maybe a port."""

    network: IPNetwork | None = None
    host: str | None = None  # exact name, or ".suffix" for "*.suffix"
    port: int | None = None

    def matches(self, host: str, addresses: Sequence[IPAddress], port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host is not None:
            name = host.lower()
            return name.endswith(self.host) if self.host.startswith(".") else name == self.host
        assert self.network is not None
        return bool(addresses) and all(
            a.version == self.network.version and a in self.network for a in addresses
        )


def parse_allow(entries: Iterable[str]) -> list[AllowRule]:
    """Rules from entries: ``loopback``, ``private``, ``any``, a CIDR or address, a host or
    ``*.domain``, each optionally followed by ``:PORT``."""
    rules: list[AllowRule] = []
    for raw in entries:
        entry = raw.strip()
        port: int | None = None
        head, sep, tail = entry.rpartition(":")
        if (
            sep
            and tail.isdigit()
            and not entry.endswith("]")
            and (head.count(":") == 0 or head.startswith("["))
        ):
            entry, port = head, int(tail)
        entry = entry.strip("[]")
        if entry == "loopback":
            rules += [
                AllowRule(network=ipaddress.ip_network("127.0.0.0/8"), port=port),
                AllowRule(network=ipaddress.ip_network("::1/128"), port=port),
                AllowRule(host="localhost", port=port),
            ]
        elif entry == "private":
            rules += [AllowRule(network=n, port=port) for n in PRIVATE_NETWORKS]
        elif entry == "any":
            rules += [
                AllowRule(network=ipaddress.ip_network("0.0.0.0/0"), port=port),
                AllowRule(network=ipaddress.ip_network("::/0"), port=port),
                AllowRule(host=".", port=port),
            ]
        elif entry.startswith("*."):
            rules.append(AllowRule(host=entry[1:].lower(), port=port))
        else:
            try:
                rules.append(
                    AllowRule(network=ipaddress.ip_network(entry, strict=False), port=port)
                )
            except ValueError:
                if not entry or "/" in entry or " " in entry:
                    raise ConfigError(f"--worker-allow: cannot read {raw!r}") from None
                rules.append(AllowRule(host=entry.lower(), port=port))
    return rules


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """The addresses ``host`` resolves to (itself when it is an address)."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # UnicodeError: not a valid IDNA name
        raise BadRequest(f"worker host {host!r} does not resolve: {exc}") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def check_worker(url: str, addresses: Sequence[IPAddress], rules: Sequence[AllowRule]) -> None:
    """Refuse a worker URL that the allow-list does not admit, saying why."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    check_address(parts.hostname or "", port, addresses, rules)


def check_address(
    host: str, port: int, addresses: Sequence[IPAddress], rules: Sequence[AllowRule]
) -> None:
    """Refuse ``host`` at ``addresses`` (all of them must pass) unless the allow-list admits
    it, saying why. Checked at registration, and again for the address of every new
    connection to a worker (a name may resolve elsewhere later)."""
    host = host.lower()
    if host in DENIED_NAMES or (host.endswith(".internal") and host.startswith("metadata")):
        raise Forbidden(f"worker host {host!r} is a cloud metadata service")
    plain = [_unmapped(a) for a in addresses]
    for address in plain:
        if any(address.version == n.version and address in n for n in DENIED_NETWORKS):
            raise Forbidden(
                f"worker address {address} is link-local, metadata or otherwise never a worker"
            )
    if not any(rule.matches(host, plain, port) for rule in rules):
        shown = ", ".join(str(a) for a in plain) or host
        raise Forbidden(
            f"worker {host}:{port} ({shown}) is not in the allow-list; add it with --worker-allow"
        )


def address_guard(rules: Sequence[AllowRule]) -> Callable[[str, int, IPAddress], None]:
    """A check of one address a worker's host resolved to, for every new connection."""

    def guard(host: str, port: int, address: IPAddress) -> None:
        check_address(host, port, [address], rules)

    return guard


def check_target(target: str) -> None:
    """Refuse a request path that a worker, or anything on the way, might read as another
    path than the one the router checked: dot segments, empty segments and backslashes,
    also percent-encoded (``/v1/../flush_cache``, ``/v1/%2e%2e/x``, ``//x``, ``/v1/..%5cx``).
    Checked on the raw path and on the decoded one (so double encoding is refused too):
    the router matches paths exactly and would rather refuse than guess how the other side
    normalises. An encoded slash alone (``a%2Fb``) passes: it cannot leave a prefix."""
    path = target.partition("?")[0]
    if (
        not path.startswith("/")
        or "//" in path
        or "\\" in path
        or ("%" in path and ("%2e" in path.lower() or "%5c" in path.lower()))
        or ("/." in path and any(segment in (".", "..") for segment in path.split("/")))
    ):
        raise BadRequest(
            f"request path {path[:200]!r} has dot segments, empty segments or backslashes; "
            "send it in its plain form"
        )


@dataclass(slots=True)
class Gate:
    """Admin and API-key checks, with the namespace a caller's key implies."""

    admin_token: str | None = None
    insecure_admin: bool = False
    api_keys: tuple[str, ...] = ()
    relayed: tuple[str, ...] = DEFAULT_RELAYED
    #: the key workers want (SGLang's ``--api-key``), sent on every call to one
    worker_api_key: str | None = None
    _tenants: dict[str, str] = field(default_factory=dict)
    _worker_authorization: bytes | None = None

    def __post_init__(self) -> None:
        for key in self.api_keys:
            self._tenants[key] = "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        if self.worker_api_key is not None:
            self._worker_authorization = b"Bearer " + self.worker_api_key.encode()

    def check_admin(self, authorization: str | None, client: str | None) -> None:
        if self.admin_token is not None:
            if not _bearer_matches(authorization, self.admin_token):
                raise Unauthorized("this admin endpoint needs Authorization: Bearer <admin token>")
            return
        if not self.insecure_admin and not is_loopback(client):
            raise Forbidden(
                "admin endpoints answer loopback clients only; set --admin-token "
                "(or --insecure-admin) to administer from elsewhere"
            )

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant of a data-plane caller; raises when keys are set and none matches."""
        if not self.api_keys:
            return None
        token = _bearer(authorization)
        if token is not None:
            for key, tenant in self._tenants.items():
                if hmac.compare_digest(token.encode(), key.encode()):
                    return tenant
        raise Unauthorized("this router needs Authorization: Bearer <api key>")

    def relays(self, path: str) -> bool:
        """Whether ``path`` goes to a worker (400 for a path with dot segments and such)."""
        check_target(path)
        return path_matches(path, self.relayed)

    def worker_headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """``headers`` as a worker may see them: the router's own credentials (its admin
        token, its API keys) taken out, and the worker's key (``worker_api_key``) put in."""
        if self._worker_authorization is None and not self.api_keys and not self.admin_token:
            return headers
        kept = [
            (name, value)
            for name, value in headers
            if name != b"authorization"
            or (self._worker_authorization is None and not self._is_ours(value))
        ]
        if self._worker_authorization is not None:
            kept.append((b"authorization", self._worker_authorization))
        return kept

    def _is_ours(self, authorization: bytes) -> bool:
        """Whether ``authorization`` is for the router: with API keys set it always is (a
        data-plane call without one is refused), else when it holds the admin token (in
        any spelling: a worker must not see it, even sent as ``Basic``)."""
        if self.api_keys:
            return True
        return self.admin_token is not None and self.admin_token.encode() in authorization


def path_matches(path: str, patterns: Iterable[str]) -> bool:
    """Whether ``path`` is one of ``patterns`` (exact, or under a prefix ending in "/")."""
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in patterns)


def is_inference_or_read_only(path: str) -> bool:
    """A built-in relayed path: sending it twice costs only compute.

    Paths opened with ``--proxy-allow`` are not: the router cannot know what they do.
    """
    return path_matches(path, DEFAULT_RELAYED)


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _bearer_matches(authorization: str | None, expected: str) -> bool:
    token = _bearer(authorization)
    return token is not None and hmac.compare_digest(token.encode(), expected.encode())
