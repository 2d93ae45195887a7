"""OpenAI-style error bodies: {"error": {"message", "type", "code"}}. Never a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.llm.base import LLMError, LLMTimeout
from app.sessions.base import SessionBusy, SessionNotFound, StoreUnavailable

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """Raise from routes for a clean OpenAI-style error."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "code": code, "param": None}}


def error_response(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


def exception_to_error(exc: BaseException) -> tuple[int, str, str]:
    """Maps a typed boundary error to (status, message, code); used by JSON routes and SSE streams alike."""
    if isinstance(exc, APIError):
        return exc.status, exc.message, exc.code
    if isinstance(exc, SessionNotFound):
        return 404, f"Session not found: {exc}", "session_not_found"
    if isinstance(exc, SessionBusy):
        return 409, "Another turn of this session is still running; try again.", "session_busy"
    if isinstance(exc, StoreUnavailable):
        return 503, "The session store is unavailable; try again shortly.", "store_unavailable"
    if isinstance(exc, LLMTimeout):
        return 504, "The language model backend timed out.", exc.code
    if isinstance(exc, LLMError):
        return exc.status, f"The language model backend is unavailable: {exc}", exc.code
    return 500, "Internal server error.", "internal_error"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code, "http_error"
        )
        return error_response(exc.status_code, str(exc.detail), code, getattr(exc, "headers", None))

    async def _typed(_: Request, exc: Exception) -> JSONResponse:
        status, message, code = exception_to_error(exc)
        if status >= 500 and code == "internal_error":
            log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        headers = exc.headers if isinstance(exc, APIError) else None
        return error_response(status, message, code, headers)

    # Typed errors are registered one by one so they are handled by ExceptionMiddleware (no re-raise);
    # `Exception` is the last resort (ServerErrorMiddleware) so no traceback ever reaches the client.
    for exc_type in (APIError, SessionNotFound, SessionBusy, StoreUnavailable, LLMError, Exception):
        app.add_exception_handler(exc_type, _typed)
