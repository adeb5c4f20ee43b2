"""The worker pool: registration, in-flight leases and the health state machine.

Pure and synchronous: no trio, no I/O, time comes in as ``now``. Because nothing
here awaits, every method is atomic under trio's cooperative scheduling.

Health states::

    PENDING ──probe ok──▶ HEALTHY ──failed request──▶ SUSPECT
                          ▲    │ ◀──probe or request ok──┘ │
       M probe successes  │    │                           │
                          │    ▼                           ▼
                        QUARANTINED ◀─────────────────────┘
          N consecutive failed probes, or
          N consecutive failed requests: connection errors, 5xx, broken streams

A PENDING worker has never been healthy (just registered, or an engine still
loading its model, which SGLang answers with a 503): failed probes leave it
PENDING, with the reason in ``last_error``; it is not routable either way.

A SUSPECT worker gets traffic only when no HEALTHY worker is left. A 4xx is the
client's fault and never counts against a worker. A successful probe lets a
suspect worker back, but only a whole successful answer clears its count of
failed requests, so a worker that answers /health yet fails every request is
still quarantined.

Probes alone cannot tell a worker that answers /health but hangs or garbles
requests from a good one, so re-admission is on probation: until a re-admitted
worker completes a request, one failed request quarantines it again, and each
such repeated quarantine holds it out longer (``HealthRules.hold_after``: no hold
the first time, then ``hold`` seconds, doubling up to ``max_hold``) before probes
may re-admit it. A completed request ends the probation and the count.

Removing a worker with requests in flight *drains* it: it takes no new requests
and leaves the pool when its last lease is released.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import BadRequest, NotFound

_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")


class WorkerState(enum.Enum):
    PENDING = "pending"
    HEALTHY = "healthy"
    SUSPECT = "suspect"
    QUARANTINED = "quarantined"


@dataclass(frozen=True, slots=True)
class HealthRules:
    failure_threshold: int = 3
    success_threshold: int = 2
    #: seconds the second quarantine in a row (no completed request between) holds a
    #: worker out before probes may re-admit it; doubled for each further one
    hold: float = 10.0
    max_hold: float = 300.0

    def hold_after(self, quarantines: int) -> float:
        """Seconds a worker quarantined ``quarantines`` times in a row is held out."""
        if quarantines <= 1:
            return 0.0
        return min(self.hold * 2.0 ** min(quarantines - 2, 60), self.max_hold)


@dataclass(slots=True, eq=False)
class Worker:
    """One registered worker and its counters."""

    url: str
    added_at: float
    state: WorkerState = WorkerState.PENDING
    draining: bool = False
    inflight: int = 0
    requests_total: int = 0
    errors_total: int = 0
    #: consecutive failed health probes
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    #: consecutive proxied requests that failed (connection error or 5xx)
    request_failures: int = 0
    #: quarantines since the worker last completed a request (re-admitted on probation)
    quarantines: int = 0
    #: no re-admission before this time
    held_until: float = 0.0
    last_checked: float | None = None
    last_error: str | None = None
    state_since: float = 0.0

    @property
    def routable(self) -> bool:
        """May take new requests (possibly as a last resort, when SUSPECT)."""
        return not self.draining and self.state in (WorkerState.HEALTHY, WorkerState.SUSPECT)

    def snapshot(self) -> dict[str, object]:
        return {
            "url": self.url,
            "healthy": self.state is WorkerState.HEALTHY and not self.draining,
            "state": "draining" if self.draining else self.state.value,
            "inflight": self.inflight,
            "requests": self.requests_total,
            "errors": self.errors_total,
            "consecutive_failures": self.consecutive_failures,
            "request_failures": self.request_failures,
            "quarantines": self.quarantines,
            "last_error": self.last_error,
        }


@dataclass(slots=True)
class Transition:
    """A health state change, reported so the shell can log and count it."""

    url: str
    old: WorkerState
    new: WorkerState
    reason: str


@dataclass(slots=True, eq=False)
class Lease:
    """One request's claim on a worker; ``release()`` is idempotent and sync."""

    pool: WorkerPool
    worker: Worker
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self.worker)


@dataclass(slots=True)
class PoolStatistics:
    total: int
    healthy: int
    routable: int
    total_inflight: int
    loads: dict[str, int]


@dataclass(slots=True, eq=False)
class WorkerPool:
    """All registered workers, keyed by normalised URL."""

    rules: HealthRules = field(default_factory=HealthRules)
    _workers: dict[str, Worker] = field(default_factory=dict)
    #: bumped on every membership change, so policies can rebuild derived state.
    version: int = 0

    # -- membership ---------------------------------------------------------

    def add(self, url: str, now: float) -> tuple[Worker, bool]:
        """Register ``url``; idempotent. Returns the worker and whether it is new."""
        worker = self._workers.get(url)
        if worker is not None:
            if worker.draining:
                # Back from draining: a membership change (it re-enters urls()),
                # so policies must rebuild derived state such as the hash ring.
                worker.draining = False
                self.version += 1
            return worker, False
        worker = Worker(url=url, added_at=now, state_since=now)
        self._workers[url] = worker
        self.version += 1
        return worker, True

    def remove(self, url: str) -> Worker:
        """Unregister ``url``; with requests in flight it drains first."""
        worker = self._workers.get(url)
        if worker is None or worker.draining:
            raise NotFound(f"worker not registered: {url}")
        if worker.inflight:
            worker.draining = True
        else:
            del self._workers[url]
        self.version += 1
        return worker

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def by_id(self, wanted: str) -> Worker | None:
        """The registered worker whose ``worker_id`` is ``wanted``."""
        for worker in self._workers.values():
            if worker_id(worker.url) == wanted:
                return worker
        return None

    def __iter__(self) -> Iterator[Worker]:
        return iter(self._workers.values())

    def __len__(self) -> int:
        return len(self._workers)

    def urls(self) -> list[str]:
        """URLs of registered workers that are not draining away."""
        return [w.url for w in self._workers.values() if not w.draining]

    def candidates(self) -> list[Worker]:
        """Workers a policy may choose: the healthy ones, else the suspect ones."""
        healthy = [
            w for w in self._workers.values() if w.state is WorkerState.HEALTHY and not w.draining
        ]
        if healthy:
            return healthy
        return [w for w in self._workers.values() if w.routable]

    # -- leases -------------------------------------------------------------

    def acquire(self, worker: Worker) -> Lease:
        if worker.draining or self._workers.get(worker.url) is not worker:
            raise BadRequest(f"worker is not accepting requests: {worker.url}")
        worker.inflight += 1
        worker.requests_total += 1
        return Lease(self, worker)

    def _release(self, worker: Worker) -> None:
        worker.inflight -= 1
        if worker.draining and worker.inflight == 0 and self._workers.get(worker.url) is worker:
            del self._workers[worker.url]
            self.version += 1

    # -- health -------------------------------------------------------------

    def probe_succeeded(self, url: str, now: float) -> Transition | None:
        worker = self._workers.get(url)
        if worker is None:
            return None
        worker.last_checked = now
        worker.consecutive_failures = 0
        worker.consecutive_successes += 1
        state = worker.state
        if state is WorkerState.QUARANTINED:
            if (
                worker.consecutive_successes >= self.rules.success_threshold
                and now >= worker.held_until
            ):
                worker.request_failures = 0
                return self._move(worker, WorkerState.HEALTHY, now, "recovered")
        elif state is not WorkerState.HEALTHY:
            # A suspect worker gets another chance, but keeps its count of failed
            # requests: a worker whose /health is fine while it fails requests is
            # still quarantined once that count reaches the threshold.
            return self._move(worker, WorkerState.HEALTHY, now, "probe ok")
        return None

    def probe_failed(self, url: str, now: float, reason: str) -> Transition | None:
        worker = self._workers.get(url)
        if worker is None:
            return None
        worker.last_checked = now
        worker.consecutive_successes = 0
        worker.consecutive_failures += 1
        worker.last_error = reason
        if worker.state is WorkerState.PENDING:
            return None  # never healthy yet (an engine still starting answers 503): not failing
        if worker.consecutive_failures >= self.rules.failure_threshold:
            return self._quarantine(worker, now, reason)
        return None

    def request_failed(self, worker: Worker, now: float, reason: str) -> Transition | None:
        """Passive signal from a proxied request: connection error or 5xx."""
        worker.errors_total += 1
        if self._workers.get(worker.url) is not worker:
            return None
        worker.consecutive_successes = 0
        worker.request_failures += 1
        worker.last_error = reason
        if worker.request_failures >= self.rules.failure_threshold or worker.quarantines:
            return self._quarantine(worker, now, reason)  # (at once when on probation)
        if worker.state is WorkerState.HEALTHY:
            return self._move(worker, WorkerState.SUSPECT, now, reason)
        return None

    def request_succeeded(self, worker: Worker, now: float) -> Transition | None:
        """Passive signal: the worker answered below 500, to the end."""
        if not (worker.request_failures or worker.consecutive_failures or worker.quarantines):
            return None
        if worker.state is not WorkerState.QUARANTINED:  # not one from before its quarantine
            worker.quarantines = 0  # probation over
        worker.request_failures = 0
        worker.consecutive_failures = 0
        if worker.state is WorkerState.SUSPECT and self._workers.get(worker.url) is worker:
            return self._move(worker, WorkerState.HEALTHY, now, "request ok")
        return None

    def _quarantine(self, worker: Worker, now: float, reason: str) -> Transition | None:
        if worker.state is WorkerState.QUARANTINED:
            return None
        worker.quarantines += 1
        worker.held_until = now + self.rules.hold_after(worker.quarantines)
        return self._move(worker, WorkerState.QUARANTINED, now, reason)

    def _move(self, worker: Worker, new: WorkerState, now: float, reason: str) -> Transition:
        old = worker.state
        worker.state = new
        worker.state_since = now
        if new is WorkerState.HEALTHY:
            worker.consecutive_failures = 0
            if not worker.request_failures:  # recovered: /workers shows no stale reason
                worker.last_error = None
        elif new is WorkerState.QUARANTINED:
            worker.consecutive_successes = 0
        return Transition(worker.url, old, new, reason)

    # -- introspection ------------------------------------------------------

    def statistics(self) -> PoolStatistics:
        workers = list(self._workers.values())
        return PoolStatistics(
            total=sum(not w.draining for w in workers),
            healthy=sum(w.state is WorkerState.HEALTHY and not w.draining for w in workers),
            routable=sum(w.routable for w in workers),
            total_inflight=sum(w.inflight for w in workers),
            loads={w.url: w.inflight for w in workers},
        )


def worker_id(url: str) -> str:
    """A worker's id, as the SGLang Model Gateway's API names workers: derived from its
    URL, so every router (and every restart) gives a worker the same id."""
    return "w-" + hashlib.sha256(url.encode()).hexdigest()[:16]


def normalize_worker_url(raw: object) -> str:
    """Validate a worker URL and return its canonical form ``scheme://host:port``."""
    from urllib.parse import urlsplit

    if not isinstance(raw, str) or not raw.strip():
        raise BadRequest('worker url is required (use ?url=... or a JSON body {"url": ...})')
    text = raw.strip()
    if "://" not in text:
        raise BadRequest(f"worker url needs a scheme (http:// or https://): {text!r}")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise BadRequest(f"invalid worker url {text!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BadRequest(f"worker url scheme must be http or https, not {parts.scheme!r}")
    if not parts.hostname:
        raise BadRequest(f"worker url has no host: {text!r}")
    if parts.username or parts.password:
        raise BadRequest("worker url must not carry credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BadRequest(f"worker url must be scheme://host:port without a path: {text!r}")
    host = parts.hostname.lower()
    problem = _host_problem(host)
    if problem:
        raise BadRequest(f"invalid worker url {text!r}: {problem}")
    if ":" in host:
        host = f"[{host}]"
    if port is None:
        port = 443 if scheme == "https" else 80
    elif port == 0:
        raise BadRequest(f"invalid worker url {text!r}: port 0 is not a port to connect to")
    return f"{scheme}://{host}:{port}"


def _host_problem(host: str) -> str | None:
    """What is wrong with a worker host name (``None`` if nothing): an address, or a DNS
    name of 1-63 character labels, 253 characters at most in its ASCII (IDNA) form."""
    if ":" in host:  # an IPv6 literal; urlsplit took off the brackets
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return f"{host!r} is not an IPv6 address"
        return None
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return f"{host!r} is not a valid host name"
    labels = ascii_host.removesuffix(".").split(".")
    if len(ascii_host) > 253 or not all(
        0 < len(label) <= 63 and _LABEL.fullmatch(label) for label in labels
    ):
        return f"{host!r} is not a valid host name"
    return None
