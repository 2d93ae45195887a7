"""Pure-ASGI HTTP middleware (no BaseHTTPMiddleware: it must not buffer SSE streams).

Per request it: accepts or makes the request id and puts it in a context var and in the request
headers (so routes reading `X-Request-Id` see the same id); echoes it in the response; counts and
times the request by route TEMPLATE (`/api/sessions/{session_id}`, never the raw path); tracks open
SSE streams; writes one JSON access log line.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability import metrics
from app.observability.context import REQUEST_ID_HEADER, accept_request_id, current_request_id
from app.observability.tracing import request_span

access_log = logging.getLogger("guardchat.access")
_HEADER = REQUEST_ID_HEADER.lower().encode()


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path is not None else "unmatched"


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, *, skip_paths: tuple[str, ...] = ("/metrics",)) -> None:
        self.app = app
        self.skip_paths = skip_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers", []))
        given = next((v.decode("latin-1") for k, v in headers if k == _HEADER), None)
        request_id = accept_request_id(given)
        if given != request_id:
            headers = [(k, v) for k, v in headers if k != _HEADER] + [(_HEADER, request_id.encode())]
            scope = {**scope, "headers": headers}
        token = current_request_id.set(request_id)
        start = time.perf_counter()
        status = 500
        streaming = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = int(message["status"])
                out = list(message.get("headers", []))
                if not any(k.lower() == _HEADER for k, _ in out):
                    out.append((_HEADER, request_id.encode()))
                ctype = next((v for k, v in out if k.lower() == b"content-type"), b"")
                if ctype.startswith(b"text/event-stream"):
                    streaming = True
                    metrics.stream_opened()
                message = {**message, "headers": out}
            await send(message)

        try:
            with request_span(scope) as span:
                await self.app(scope, receive, send_wrapper)
                _set_status(span, status)
        finally:
            if streaming:
                metrics.stream_closed()
            seconds = time.perf_counter() - start
            route = route_template(scope)
            method = scope.get("method", "GET")
            if scope.get("path") not in self.skip_paths:
                metrics.observe_request(route, method, status, seconds)
                access_log.info(
                    "%s %s %s", method, route, status,
                    extra={"route": route, "method": method, "status": status,
                           "duration_ms": round(seconds * 1000, 3), "stream": streaming},
                )
            current_request_id.reset(token)


def _set_status(span: Any, status: int) -> None:
    if span is not None:
        span.set_attribute("http.response.status_code", status)
