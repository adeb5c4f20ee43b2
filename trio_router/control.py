"""The control plane: a Quart-Trio app for the router's own endpoints.

Worker administration (``/add_worker``, ``/remove_worker``, ``/list_workers``,
gateway-style ``/workers``), ``/health``, ``/readiness``, JSON ``/metrics`` and
Prometheus ``/prometheus``. Every error is the JSON error document.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .errors import BadRequest, NotFound, RouterError, error_body
from .pool import Worker, WorkerState, worker_id
from .request_json import loads_object
from .router import Router
from .token_cache import scope_of

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def worker_view(worker: Worker) -> dict[str, Any]:
    """A worker as ``/workers`` shows it: ours, and the fields the SGLang Model Gateway
    names (slime and miles deregister engines by ``id``)."""
    return {
        **worker.snapshot(),
        "id": worker_id(worker.url),
        "is_healthy": worker.state is WorkerState.HEALTHY and not worker.draining,
        "load": worker.inflight,
        "worker_type": "regular",
    }


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status=status, content_type="application/json")


INLINE_ANSWER_BYTES = 1024 * 1024


def json_pieces_response(pieces: Iterator[bytes]) -> Response:
    """A JSON document given in pieces: one body when small, else streamed as made."""
    head: list[bytes] = []
    size = 0
    for piece in pieces:
        head.append(piece)
        size += len(piece)
        if size > INLINE_ANSWER_BYTES:
            break
    else:
        return Response(b"".join(head), content_type="application/json")

    async def rest() -> AsyncIterator[bytes]:
        for piece in head:
            yield piece
        for piece in pieces:
            yield piece
            await trio.lowlevel.checkpoint()

    return Response(rest(), content_type="application/json")


async def json_object() -> dict[str, Any]:
    """The request's JSON object body; empty when there is no body."""
    raw = await request.get_data(as_text=False)
    if not raw or not raw.strip():
        return {}
    return loads_object(raw if isinstance(raw, bytes) else raw.encode())


async def worker_url_argument() -> object:
    """The worker URL from ``?url=``/``?worker_url=`` or a JSON body ``{"url": ...}``."""
    for name in ("url", "worker_url"):
        if name in request.args:
            return request.args[name]
    body = await json_object()
    for name in ("url", "worker_url"):
        if name in body:
            return body[name]
    raise BadRequest('worker url is required (use ?url=... or a JSON body {"url": ...})')


def create_control_app(router: Router) -> QuartTrio:
    here = str(Path(__file__).parent)  # explicit: flask's package lookup trips on editable installs
    app = QuartTrio(__name__, root_path=here, instance_path=here)
    app.config.update(
        RESPONSE_TIMEOUT=None,  # quart's 60 s default would cut long answers
        BODY_TIMEOUT=router.config.body_timeout or None,  # 408 beyond (0: no limit)
        MAX_CONTENT_LENGTH=router.config.max_body_size,
    )

    admin_paths = {"/add_worker", "/remove_worker"}

    @app.before_request
    async def guard() -> None:
        path, method = request.path, request.method
        if (
            path in admin_paths
            or (path == "/workers" and method in ("POST", "DELETE"))
            or path.startswith("/workers/")
        ):
            router.gate.check_admin(request.headers.get("authorization"), request.remote_addr)

    @app.errorhandler(RouterError)
    async def router_error(exc: RouterError) -> Response:
        response = Response(error_body(exc.message, exc.kind, exc.status), status=exc.status)
        response.content_type = "application/json"
        for name, value in exc.headers():
            response.headers[name.decode()] = value.decode()
        return response

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        response = Response(error_body(exc.description or exc.name, kind, status), status=status)
        response.content_type = "application/json"
        return response

    def workers_summary() -> dict[str, int]:
        return router.worker_loads()

    @app.post("/add_worker")
    async def add_worker() -> Response:
        worker, added = await router.add_worker(await worker_url_argument())
        return json_response(
            {
                "status": "success",
                "added": added,
                "worker": worker.snapshot(),
                "worker_urls": workers_summary(),
            }
        )

    @app.post("/remove_worker")
    async def remove_worker() -> Response:
        worker = router.remove_worker(await worker_url_argument())
        return json_response(
            {
                "status": "success",
                "removed": worker.url,
                "draining": worker.draining,
                "worker_urls": workers_summary(),
            }
        )

    @app.get("/list_workers")
    async def list_workers() -> Response:
        return json_response({"urls": router.pool.urls()})

    @app.get("/workers")
    async def get_workers() -> Response:
        stats = router.pool.statistics()
        return json_response(
            {
                "workers": [worker_view(w) for w in router.pool],
                "total": stats.total,
                "healthy": stats.healthy,
                "policy": router.policy.name,
            }
        )

    @app.get("/workers/<path:key>")
    async def get_worker(key: str) -> Response:
        worker = router.pool.by_id(key) or router.pool.get(key)
        if worker is None:
            raise NotFound(f"no worker {key!r}")
        return json_response(worker_view(worker))

    @app.post("/workers")
    async def post_workers() -> Response:
        body = await json_object()
        if "url" not in body:
            raise BadRequest('JSON body {"url": ...} is required')
        worker, added = await router.add_worker(body["url"])
        identity = worker_id(worker.url)
        return json_response(
            {
                "status": "success",
                "added": added,
                "worker_id": identity,
                "location": f"/workers/{identity}",
                "worker": worker_view(worker),
            }
        )

    @app.delete("/workers")
    async def delete_workers() -> Response:
        worker = router.remove_worker(await worker_url_argument())
        return json_response(
            {"status": "success", "removed": worker.url, "draining": worker.draining}
        )

    @app.delete("/workers/<path:key>")
    async def delete_worker_by_path(key: str) -> Response:
        """By id (the gateway's way: 202, as SGLang Model Gateway answers) or by URL (200)."""
        by_id = router.pool.by_id(key)
        worker = router.remove_worker(by_id.url if by_id is not None else key)
        document = {"status": "success", "removed": worker.url, "draining": worker.draining}
        if by_id is None:
            return json_response(document)
        return json_response({**document, "status": "accepted", "worker_id": key}, 202)

    @app.get("/health")
    async def health() -> Response:
        return json_response(router.health_report())

    @app.get("/readiness")
    async def readiness() -> Response:
        report = router.health_report()
        return json_response(report, 200 if report["healthy_workers"] else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return json_response(router.json_metrics())

    @app.post("/retrieve_from_text")
    async def retrieve_from_text() -> Response:
        cache = router.token_cache
        if cache is None:
            raise BadRequest("the token cache is off; start the router with --radix-tree-max-size")
        tenant = router.gate.tenant(request.headers.get("authorization"))
        body = await json_object()
        declared = request.headers.get(router.config.namespace_header, "")
        answer = await cache.retrieve(body.get("text"), scope_of(tenant, declared))
        return json_pieces_response(answer)

    dashboard = (Path(__file__).parent / "dashboard.html").read_bytes()

    @app.get("/dashboard")
    async def dashboard_page() -> Response:
        return Response(dashboard, content_type="text/html; charset=utf-8")

    @app.get("/prometheus")
    async def prometheus() -> Response:
        return Response(router.metrics.render(), content_type=PROMETHEUS_CONTENT_TYPE)

    return app
