"""trio_router: a token-exact HTTP router for SGLang workers in RL rollouts."""

from .config import RouterConfig
from .errors import ConfigError, RouterError
from .hooks import Middleware, Outcome, ProxyRequest, Reply, ResponseHead
from .router import Router, open_router
from .server import RunningRouter, serve

__all__ = [
    "ConfigError",
    "Middleware",
    "Outcome",
    "ProxyRequest",
    "Reply",
    "ResponseHead",
    "Router",
    "RouterConfig",
    "RouterError",
    "RunningRouter",
    "open_router",
    "serve",
]
__version__ = "0.1.0"
