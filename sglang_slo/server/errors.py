"""Errors the HTTP server returns, in OpenAI's error format.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": 400}}

The `openai` client raises `BadRequestError` / `RateLimitError` from these and exposes
`param` and `message`.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error answered with `status` and an OpenAI-format body; `param` names the field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = ""):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or _KIND.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


_KIND = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def bad_request(param: str | None, message: str) -> ApiError:
    """400 naming `param`; the message starts with the field so it reads on its own."""
    text = message if param is None or message.startswith(param) else f"{param}: {message}"
    return ApiError(400, text, param)
