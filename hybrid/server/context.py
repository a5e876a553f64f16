"""What the routes share: the server's state (backend, API key, metrics) and per-request
helpers (the backend once ready, the JSON body, whether the client has gone)."""

from __future__ import annotations

import threading

from flask import current_app, request

from hybrid.inject.progress import Progress

from .backend import Backend
from .body import parse as parse_body
from .errors import invalid, loading
from .metrics import Metrics


class ServerState:
    """What the routes share: the backend once the model is ready, the key, the metrics."""

    def __init__(self, api_key: str | None, backend_kwargs: dict):
        self.api_key = api_key
        self.metrics = Metrics()
        self.backend: Backend | None = None
        self.load_error: str | None = None
        self.progress = Progress()   # the start's stages, shown by /health until the model answers
        self.tiers = None            # a tiered start's kernel tier (hybrid.inject.tiered.Tiers), or None
        self._backend_kwargs = backend_kwargs
        self._lock = threading.Lock()

    def attach(self, engine) -> Backend:
        """Serve `engine` (already started)."""
        with self._lock:
            self.backend = Backend(engine, self.metrics, **self._backend_kwargs)
        return self.backend

    def fail(self, message: str) -> None:
        self.load_error = message



def state() -> ServerState:
    return current_app.extensions["hybrid"]


def backend() -> Backend:
    be = state().backend
    if be is None:
        raise loading()
    return be


def json_body(require_json_type: bool = True) -> dict:
    """The request's JSON object. OpenAI routes require `Content-Type: application/json`;
    Ollama's accept any (its own docs post with bare `curl -d`)."""
    if require_json_type and not request.is_json:
        raise invalid(f"Content-Type must be application/json, got {request.mimetype or 'none'!r}",
                      code="invalid_content_type")
    return parse_body(request.get_data(cache=False))   # over MAX_CONTENT_LENGTH: 413


def client_gone():
    """A callable telling whether this request's client has disconnected (waitress sets it;
    None under servers that do not)."""
    return request.environ.get("waitress.client_disconnected")


def ollama_path() -> bool:
    return request.path.startswith("/api/")


def anthropic_path() -> bool:
    return request.path.rstrip("/") == "/v1/messages"
