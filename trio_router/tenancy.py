"""Each API-key tenant gets its own KV namespace on the workers.

SGLang keys its prefix (KV) cache by a request's ``extra_key`` too, so a
prompt cached for one tenant is no hit for another: without it,
``meta_info.cached_tokens`` (and timing) told tenant B how much of tenant A's
private prompt it shared. The router sets ``extra_key`` on every inference
body of a tenant; a client's own ``extra_key`` (or list of them, one per batch
item) is kept after the tenant's, so clients can still separate their own
caches but never reach another tenant's.

Pure: bytes in, bytes out.
"""

from __future__ import annotations

from typing import Final

import orjson

from .errors import BadRequest

__all__ = ["KV_SCOPED_PATHS", "kv_scoped_body", "tenant_kv_key"]

#: Inference paths whose JSON bodies reach a worker's prefix cache.
KV_SCOPED_PATHS: Final = frozenset({"/generate", "/v1/chat/completions", "/v1/completions"})
SESSION_PREFIX: Final = "/sessions/"


def tenant_kv_key(tenant: str) -> str:
    """The ``extra_key`` of ``tenant``'s requests."""
    return f"trio-router:{tenant}"


def needs_kv_scope(path: str, method: str) -> bool:
    """Whether a tenant's request on ``path`` gets its KV namespace."""
    return method == "POST" and (path in KV_SCOPED_PATHS or path.startswith(SESSION_PREFIX))


def kv_scoped_body(body: bytes, tenant: str) -> bytes | None:
    """``body`` with ``extra_key`` set to ``tenant``'s namespace (the client's own key
    appended); None for a body that is not a JSON object (left for the handler to refuse)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    scope = tenant_kv_key(tenant)
    given = document.get("extra_key")
    if given is None:
        document["extra_key"] = scope
    elif isinstance(given, str):
        document["extra_key"] = f"{scope}:{given}"
    elif isinstance(given, list) and all(isinstance(key, str) for key in given):
        document["extra_key"] = [f"{scope}:{key}" for key in given]
    else:
        raise BadRequest('"extra_key" must be a string or a list of strings')
    return orjson.dumps(document)
