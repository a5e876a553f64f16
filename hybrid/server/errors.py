"""API errors: one exception type, rendered in the OpenAI envelope or Ollama's form.

Routes and validation raise `APIError`; the app's error handlers render it, so a bad
request never reaches the engine and a handler never formats an error itself.
"""

from __future__ import annotations

import json


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict:
        return {"error": self.message}

    def anthropic_body(self) -> dict:
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(self.status, "api_error"),
                                           "message": self.message}}


# Anthropic's error types by HTTP status (its own 529 overloaded_error is our 503)
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_length_exceeded(message: str, param: str = "messages") -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded")


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")


def queue_full(retry_after: int = 1) -> APIError:
    return APIError(429, "The server is busy: the request queue is full; retry later",
                    type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry_after)})


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down; retry on another instance or later", type="server_error",
                    code="shutting_down", headers={"Retry-After": "5"})


def loading() -> APIError:
    return APIError(503, "The model is still loading; retry later", type="server_error",
                    code="model_loading", headers={"Retry-After": "2"})


def internal(message: str = "Internal server error") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def sse_error(err: APIError) -> str:
    """The event that ends a stream which failed after its headers were sent."""
    return f"data: {json.dumps(err.openai_body())}\n\n"
