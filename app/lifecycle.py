"""Graceful shutdown: on SIGTERM the server drains before it exits.

    SIGTERM ──► draining: new API requests get 503 `shutting_down` (Connection: close), /readyz says
                "draining" so a load balancer stops sending traffic; in-flight requests and streams go on
           ──► when none is left, or after GUARDCHAT_SHUTDOWN_GRACE_S, uvicorn's own shutdown runs
               (sockets closed, lifespan shutdown, exit)
    a second SIGTERM skips the wait.

uvicorn installs its handlers with `signal.signal`; `install_sigterm_drain` (called from the lifespan, so it
runs inside the server's loop after uvicorn's handlers exist) puts ours in front and hands over to uvicorn's
handler once drained. Under a server that owns no signals (tests running uvicorn in a thread) it does nothing;
`Drain.begin()` can be called directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import error_response

log = logging.getLogger(__name__)

# Requests that count as "in flight" for draining: the API. Gradio's long-lived UI event streams would
# otherwise hold every shutdown for the full grace period.
TRACKED_PREFIXES = ("/v1/", "/api/", "/admin/api/")
ALWAYS_OPEN = frozenset({"/healthz"})


class Drain:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.draining = False
        self.in_flight = 0
        self.started_at: float | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self.started_at = time.monotonic()
            log.warning("draining: refusing new requests; %d in flight; grace %.0f s", self.in_flight, self.grace_s)

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    def remaining_s(self) -> float:
        if self.started_at is None:
            return self.grace_s
        return max(0.0, self.grace_s - (time.monotonic() - self.started_at))

    async def wait_idle(self) -> bool:
        """Waits until nothing is in flight or the grace period is over. True when drained cleanly."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.remaining_s())
            return True
        except TimeoutError:
            return False


class DrainMiddleware:
    """Counts in-flight API requests; while draining, answers new ones with 503 and /readyz with 503."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ALWAYS_OPEN:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if self.drain.draining:
            if path == "/readyz":
                body_code, message = "not_ready", "Not ready: draining for shutdown."
            else:
                body_code, message = "shutting_down", "The server is shutting down; retry on another replica."
            headers = {"Connection": "close", "Retry-After": "1"}
            await error_response(503, message, body_code, headers)(scope, receive, send)
            return
        if not path.startswith(TRACKED_PREFIXES):
            await self.app(scope, receive, send)
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()


def install_sigterm_drain(drain: Drain) -> bool:
    """Routes SIGTERM through the drain, then to the previous handler (uvicorn's). Returns False (and does
    nothing) outside the main thread or without a running loop."""
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    previous = signal.getsignal(signal.SIGTERM)
    tasks: set[asyncio.Task[None]] = set()

    def hand_over() -> None:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGTERM)
        _shorten_uvicorn_grace(previous, drain)
        if callable(previous):
            previous(signal.SIGTERM, None)
        else:  # no server handler: restore the default action and deliver the signal again
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    async def drain_then_hand_over() -> None:
        clean = await drain.wait_idle()
        if not clean:
            log.warning("grace period over with %d request(s) still in flight", drain.in_flight)
        hand_over()

    def on_sigterm() -> None:
        if drain.draining:  # a second SIGTERM: stop waiting
            hand_over()
            return
        drain.begin()
        task = loop.create_task(drain_then_hand_over())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    return True


def _shorten_uvicorn_grace(handler: Callable[..., Any] | int | None, drain: Drain) -> None:
    """uvicorn waits `timeout_graceful_shutdown` for connections again after our drain; what is left in
    flight has had its grace period, so give it at most one more second."""
    server = getattr(handler, "__self__", None)
    config = getattr(server, "config", None)
    if config is not None and hasattr(config, "timeout_graceful_shutdown"):
        config.timeout_graceful_shutdown = 1.0
