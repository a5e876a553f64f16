"""The Flask app: state, auth, request bodies, error rendering, health and metrics.

Routes live in openai_api.py, ollama_api.py and anthropic_api.py; the body's JSON checks in body.py, field
validation in schema.py (pydantic, also the OpenAPI document of openapi.py) and
requests.py; formatting in responses.py; submission in backend.py, through the engine's
API (submit, cancel, stats, describe). The engine thread owns the model.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from .context import ServerState, anthropic_path, ollama_path, state
from .errors import APIError, internal
from .metrics import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

PUBLIC = {"/", "/health", "/api/version", "/openapi.json"}     # answered without an API key
DEFAULT_MAX_BODY = 8 * 1024 * 1024


def create_app(model_or_engine=None, *, api_key: str | None = None, served_model_name: str | None = None,
               aliases=(), strict_model_names: bool = False, slots: int = 4, ctx: int | None = None,
               max_queue: int = 64, max_body: int = DEFAULT_MAX_BODY,
               default_max_tokens: int | None = None, max_inflight: int | None = None) -> Flask:
    """The server app. `model_or_engine`: a started `Engine`, a `Model` (an engine is made and
    started for it), or None: the app answers 503 until `app.extensions["hybrid"].attach(engine)`.
    `default_max_tokens` caps requests that set no max_tokens (None: they may fill the context).
    `max_inflight`: generation requests served at once; more get 429 with Retry-After (None: no
    bound here, the engine's queue still bounds them)."""
    app = Flask("hybrid.server")
    app.config["MAX_CONTENT_LENGTH"] = max_body
    app.json.sort_keys = False
    state = ServerState(api_key or None, dict(served_name=served_model_name, aliases=aliases,
                                              strict_names=strict_model_names, ctx=ctx,
                                              default_max_tokens=default_max_tokens,
                                              max_inflight=max_inflight))
    app.extensions["hybrid"] = state
    if model_or_engine is not None:
        engine = model_or_engine
        if not hasattr(engine, "submit"):
            from hybrid.engine.scheduler import Engine

            engine = Engine(model_or_engine, slots=slots, ctx=ctx, max_queue=max_queue)
            engine.start()
        state.attach(engine)

    from . import anthropic_api, ollama_api, openai_api

    app.register_blueprint(openai_api.bp)
    app.register_blueprint(ollama_api.bp)
    app.register_blueprint(anthropic_api.bp)
    app.before_request(_before)
    app.after_request(_count)
    app.register_error_handler(APIError, _render_error)
    app.register_error_handler(HTTPException, lambda e: _render_error(_from_http(e)))
    app.register_error_handler(Exception, _unexpected)

    @app.get("/")
    def root():
        return Response("hybrid is running\n", mimetype="text/plain")

    @app.get("/health")
    def health():
        be = state.backend
        if be is not None and be.draining:
            return {"status": "draining", "model": be.name}, 503, {"Retry-After": "5"}
        if be is not None:
            body = {"status": "ok", "model": be.name}
            if state.tiers is not None:  # answering on torch while the kernels compile, or swapped since
                body["kernels"] = state.tiers.snapshot()
            return body
        if state.load_error:
            return {"status": "error", "error": state.load_error}, 503
        return {"status": "loading", "progress": state.progress.snapshot()}, 503, {"Retry-After": "2"}

    @app.get("/openapi.json")
    def openapi():
        from .openapi import document

        return document()

    @app.get("/metrics")
    def metrics():
        return Response(state.metrics.render(), mimetype=CONTENT_TYPE_LATEST)

    return app


# ---------------------------------------------------------------- hooks and error rendering

def _before():
    g.received = time.perf_counter()
    g.request_id = uuid.uuid4().hex[:16]
    key = state().api_key
    if key is None or request.path in PUBLIC or request.method == "OPTIONS":
        return None
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    given = given.strip() or request.headers.get("x-api-key", "").strip()   # Anthropic's clients send x-api-key
    if not hmac.compare_digest(given.encode(), key.encode()):
        msg = ("Incorrect API key provided" if given
               else "Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
        raise APIError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return None


def _count(response):
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    state().metrics.requests.labels(rule, str(response.status_code)).inc()
    if "request_id" in g:
        response.headers["X-Request-Id"] = g.request_id
    return response


def _render_error(err: APIError):
    body = err.ollama_body() if ollama_path() else err.anthropic_body() if anthropic_path() else err.openai_body()
    return Response(json.dumps(body), status=err.status, headers=err.headers, mimetype="application/json")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _from_http(e: HTTPException) -> APIError:
    status = e.code or 500
    if status == 404:
        msg = f"Unknown route: {request.method} {request.path}"
    elif status == 405:
        msg = f"Method {request.method} is not allowed for {request.path}"
    elif status == 413:
        msg = f"The request body is larger than {current_app.config['MAX_CONTENT_LENGTH']} bytes"
    else:
        msg = e.description or e.name
    headers = {k: v for k, v in e.get_headers() if k.lower() == "allow"}
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return APIError(status, msg, type=kind, code=_HTTP_CODES.get(status), headers=headers)


def _unexpected(e: Exception):
    rid = g.get("request_id", "-")
    log.exception("unhandled error in %s %s (request id %s)", request.method, request.path, rid)
    return _render_error(internal(f"Internal server error: {type(e).__name__} (request id {rid})"))
