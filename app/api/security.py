"""Auth, limits and security headers for the whole app, added by `add_security(app, runtime)` (app/main.py).

Middleware, outermost first:
  EdgeMiddleware    security headers on every response; body size limit (413 before any parsing)
  DrainMiddleware   graceful shutdown (app/lifecycle.py): 503 for new requests while draining
  CORSMiddleware    only when GUARDCHAT_CORS_ORIGINS is set (outside auth so preflights and errors carry CORS)
  AccessMiddleware  API keys on /v1/* and /api/*, admin-only knowledge writes, chat keys out of /admin/*,
                    the per-key rate limit (per address for the web chat's calls that run a turn);
                    records the caller as `request.state.guardchat_principal`
Routes use `request_owner()` / `require_session_owner()` for session ownership and `check_message_limits()`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import APIError, error_body, error_response
from app.api.ratelimit import KeyRateLimiter
from app.lifecycle import Drain, DrainMiddleware
from app.sessions.base import SessionInfo, SessionNotFound, SessionStore
from app.settings import Settings

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
API_PREFIXES = ("/v1/", "/api/")
KNOWLEDGE_PREFIX = "/api/knowledge"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PRINCIPAL_KEY = "guardchat_principal"  # in scope["state"], i.e. request.state.guardchat_principal
MULTIPART_OVERHEAD_BYTES = 1_000_000  # form boundaries and fields around an uploaded document
# The web chat's Gradio calls that start work (a chat turn, feedback, a new chat, an upload): they draw from the
# same rate limit as the API, per client address (the UI sends no key). Its page, config, static assets and
# the queue's result stream (/gradio_api/queue/data) stay outside: they run nothing, and a page load must not
# spend the budget. The admin console's own calls (/admin/...) are not limited, like the admin API.
UI_WORK_PREFIXES = (
    "/gradio_api/queue/join",
    "/gradio_api/run/",
    "/gradio_api/api/",
    "/gradio_api/call/",
    "/gradio_api/upload",
)

# Gradio renders with inline scripts and styles and loads its fonts from Google Fonts; everything else is
# same-origin. frame-ancestors 'none' is the modern X-Frame-Options: DENY (both are sent).
UI_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; "
    "style-src 'self' 'unsafe-inline' https://fonts.googleapis.com; font-src 'self' data: https://fonts.gstatic.com; "
    "img-src 'self' data: blob:; media-src 'self' data: blob:; connect-src 'self'; worker-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'self'; form-action 'self'; object-src 'none'"
)
# FastAPI's Swagger UI and ReDoc load their bundles from jsDelivr.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src 'self' https://fonts.gstatic.com; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
    "worker-src 'self' blob:; frame-ancestors 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}


# --- who is calling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    kind: Literal["anonymous", "chat", "admin"]
    owner: str | None = None  # hash of the key; stored as the owner of the sessions this caller creates


ANONYMOUS = Principal("anonymous")


def hash_key(key: str) -> str:
    """The stored identity of a key: never the key itself (sessions in Redis, rate limit counters)."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    raw = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
    return raw or None


def admin_token(settings: Settings) -> str | None:
    """The configured admin token, or None (then nobody is an admin). The one place it is read: the REST admin API,
    the admin console and the key ring all ask here (issue 20)."""
    return _secret(settings.admin_token)


def is_admin_token(settings: Settings, given: str | None) -> bool:
    """Constant-time check of a presented admin token; no configured token means nobody is an admin (fail closed)."""
    expected = admin_token(settings)
    if not expected or not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", errors="surrogateescape"), expected.encode("utf-8"))


class KeyRing:
    """The configured chat keys and the admin token. `identify` compares the token against every key in
    constant time and never stops early, so timing tells nothing about which key (or how much) matched."""

    def __init__(self, api_keys: Sequence[str], admin_token: str | None) -> None:
        self._keys = [k.encode("utf-8") for k in api_keys if k]
        self._admin = admin_token.encode("utf-8") if admin_token else None

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        keys = [k for k in (_secret(s) for s in settings.api_keys) if k]
        return cls(keys, admin_token(settings))

    @property
    def auth_required(self) -> bool:
        return bool(self._keys)

    def identify(self, token: str) -> Principal | None:
        given = token.encode("utf-8", errors="surrogateescape")
        chat_match = False
        for key in self._keys:
            chat_match |= hmac.compare_digest(given, key)
        admin_match = self._admin is not None and hmac.compare_digest(given, self._admin)
        if admin_match:
            return Principal("admin", hash_key(token))
        if chat_match:
            return Principal("chat", hash_key(token))
        return None


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def principal_of(request: Request) -> Principal:
    principal = getattr(request.state, PRINCIPAL_KEY, None)
    return principal if isinstance(principal, Principal) else ANONYMOUS


def request_owner(request: Request) -> str | None:
    """The owner id new sessions of this request get (None when the server runs without keys)."""
    return principal_of(request).owner


async def require_session_owner(store: SessionStore, session_id: str, owner: str | None) -> SessionInfo:
    """The session, if `owner` created it; otherwise SessionNotFound (404: never reveal that it exists)."""
    info = await store.get(session_id)
    if info is None or info.owner != owner:
        raise SessionNotFound(session_id)
    return info


# --- limits on the request body ------------------------------------------------------------------------


def _content_chars(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(str(part.get("text", ""))) if isinstance(part, dict) else 0 for part in content)
    return len(str(content))


def check_message_limits(messages: Sequence[Any], settings: Settings) -> None:
    """413 naming the limit when there are too many messages or one is too long (pydantic ChatMessages)."""
    if len(messages) > settings.max_messages:
        raise APIError(
            413,
            f"Too many messages: {len(messages)}; the limit is {settings.max_messages} "
            "(max_messages, GUARDCHAT_MAX_MESSAGES).",
            "too_many_messages",
        )
    for index, message in enumerate(messages):
        content = getattr(message, "content", None)
        check_text_limit(_content_chars(content), settings, f"messages[{index}]")
        check_characters(_content_text(content), f"messages[{index}]")


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) if isinstance(part, dict) else "" for part in content)
    return str(content or "")


def check_characters(text: str, field: str) -> None:
    """400 for text no model should see: NUL (some backends truncate at it) and lone surrogates (JSON allows
    the escape, UTF-8 cannot encode it, and the tokenizers raise on it)."""
    if "\x00" in text:
        raise APIError(400, f"{field} contains a NUL character.", "invalid_characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, f"{field} contains an unpaired surrogate (invalid Unicode).", "invalid_characters"
        ) from None


def check_text_limit(chars: int, settings: Settings, field: str) -> None:
    if chars > settings.max_message_chars:
        raise APIError(
            413,
            f"{field} is {chars} characters long; the limit is {settings.max_message_chars} "
            "(max_message_chars, GUARDCHAT_MAX_MESSAGE_CHARS).",
            "message_too_long",
        )


def body_limit_for(path: str, settings: Settings) -> int:
    if path.startswith(KNOWLEDGE_PREFIX):  # document uploads have their own, larger limit
        return max(settings.max_body_bytes, settings.ingest_max_file_bytes + MULTIPART_OVERHEAD_BYTES)
    return settings.max_body_bytes


def _too_large(limit: int) -> HTTPException:
    # fastapi.HTTPException (not Starlette's): FastAPI re-raises it while reading the body instead of
    # turning it into a 400, and the app's handler renders the OpenAI-style 413.
    return HTTPException(413, f"Request body is larger than {limit} bytes (max_body_bytes, GUARDCHAT_MAX_BODY_BYTES).")


class EdgeMiddleware:
    """Security headers on every HTTP response and the body size limit, checked before anything parses."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        limit = body_limit_for(path, self.settings)
        csp = DOCS_CSP if path in ("/docs", "/redoc") else UI_CSP
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in (*SECURITY_HEADERS.items(), ("content-security-policy", csp)):
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        declared = _content_length(scope)
        if declared is not None and declared > limit:
            exc = _too_large(limit)
            await error_response(413, str(exc.detail), "request_too_large")(scope, receive, send_with_headers)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # chunked bodies have no Content-Length: count as they arrive
                    raise _too_large(limit)
            return message

        try:
            await self.app(scope, counting_receive, send_with_headers)
        except HTTPException as exc:
            if exc.status_code != 413 or started:
                raise
            await error_response(413, str(exc.detail), "request_too_large")(scope, receive, send_with_headers)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# --- access: keys, roles, rate limit -------------------------------------------------------------------


class SecurityRuntime:
    """What the middleware needs at request time; filled in at startup (the admin token may be generated)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keyring = KeyRing.from_settings(settings)
        self.limiter: KeyRateLimiter | None = None
        self.drain = Drain(settings.shutdown_grace_s)

    async def startup(self) -> None:
        ensure_admin_token(self.settings)
        warn_if_exposed(self.settings)
        self.keyring = KeyRing.from_settings(self.settings)
        if self.settings.rate_limit:
            self.limiter = KeyRateLimiter(
                self.settings.rate_limit, redis_url=self.settings.redis_url, key_prefix=self.settings.redis_key_prefix
            )

    async def shutdown(self) -> None:
        if self.limiter is not None:
            await self.limiter.aclose()


class AccessMiddleware:
    def __init__(self, app: ASGIApp, runtime: SecurityRuntime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        token = bearer_token(scope)
        keyring = self.runtime.keyring
        principal = keyring.identify(token) if token else None
        if path == "/admin" or path.startswith("/admin/"):
            # The admin API and console check the admin token themselves; a chat key is simply not enough.
            if principal is not None and principal.kind == "chat":
                await _deny(scope, receive, send, 403, "A chat API key cannot use the admin interface.", "forbidden")
                return
        elif path.startswith(API_PREFIXES):
            if principal is None:
                if keyring.auth_required:
                    message = "Invalid API key." if token else "An API key is required (Authorization: Bearer <key>)."
                    code = "invalid_api_key" if token else "missing_api_key"
                    await _deny(scope, receive, send, 401, message, code, {"WWW-Authenticate": "Bearer"})
                    return
                principal = ANONYMOUS  # open mode (no keys configured): loopback development
            if principal.kind == "chat" and path.startswith(KNOWLEDGE_PREFIX) and scope["method"] in WRITE_METHODS:
                message = "Changing the knowledge base needs the admin token."
                await _deny(scope, receive, send, 403, message, "forbidden")
                return
            if await self._over_limit(scope, receive, send, principal.owner or f"ip:{_client_host(scope)}", ui=False):
                return
            scope.setdefault("state", {})[PRINCIPAL_KEY] = principal
        elif is_ui_work(scope) and await self._over_limit(scope, receive, send, f"ip:{_client_host(scope)}", ui=True):
            return
        await self.app(scope, receive, send)

    async def _over_limit(self, scope: Scope, receive: Receive, send: Send, identity: str, *, ui: bool) -> bool:
        """Counts one request for `identity`; past the limit, answers 429 with Retry-After and returns True.
        The body is the OpenAI-style error; for the web chat also `detail`, the field Gradio's client shows."""
        if self.runtime.limiter is None:
            return False
        decision = await self.runtime.limiter.check(identity)
        if decision.allowed:
            return False
        retry = str(decision.retry_after_s)
        message = f"Rate limit exceeded ({decision.limit}); retry after {retry} s."
        body = error_body(429, message, "rate_limit_exceeded")
        if ui:
            body["detail"] = message
        await JSONResponse(body, status_code=429, headers={"Retry-After": retry})(scope, receive, send)
        return True


def is_ui_work(scope: Scope) -> bool:
    """A web chat request that runs a function (see UI_WORK_PREFIXES)."""
    return scope["method"] == "POST" and str(scope["path"]).startswith(UI_WORK_PREFIXES)


async def _deny(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    message: str,
    code: str,
    headers: dict[str, str] | None = None,
) -> None:
    await error_response(status, message, code, headers)(scope, receive, send)


def _client_host(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


# --- start-up checks -----------------------------------------------------------------------------------


def ensure_admin_token(settings: Settings) -> str:
    """The admin token; when GUARDCHAT_ADMIN_TOKEN is unset, generates one, stores it in `settings` and prints
    it once (to stderr, not to the logs). Replicas must share one: set GUARDCHAT_ADMIN_TOKEN for them."""
    existing = admin_token(settings)
    if existing:
        return existing
    from pydantic import SecretStr

    token = secrets.token_urlsafe(32)
    settings.admin_token = SecretStr(token)
    print(
        f"\nguardchat: no GUARDCHAT_ADMIN_TOKEN set; generated an admin token for this process:\n\n    {token}\n\n"
        "Set GUARDCHAT_ADMIN_TOKEN to keep one across restarts and replicas.\n",
        file=sys.stderr,
        flush=True,
    )
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(settings: Settings) -> bool:
    """Warns loudly when the server binds beyond loopback with no API keys. Returns True when it warned."""
    if is_loopback(settings.host) or settings.api_keys:
        return False
    bar = "!" * 72
    log.warning(
        "%s\nguardchat binds to %s WITHOUT API KEYS: anyone who can reach it can use the chat API.\n"
        "Set GUARDCHAT_API_KEYS (comma-separated keys, or a JSON list) or bind to 127.0.0.1.\n%s",
        bar,
        settings.host,
        bar,
    )
    return True


# --- installation --------------------------------------------------------------------------------------


def add_security(app: FastAPI, runtime: SecurityRuntime) -> None:
    """Adds the middleware above and CORS (only when origins are configured) to `app` (the docs switch is
    `create_app`'s: with `docs_enabled` off the app is built without docs routes). The app's
    lifespan (app/main.py) runs `runtime.startup()` / `shutdown()` and installs the SIGTERM drain. Call once from
    `create_app`, after the routers are included."""
    settings = runtime.settings
    app.state.guardchat_security = runtime
    app.add_middleware(AccessMiddleware, runtime=runtime)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Session-Id", "X-Request-Id", "X-Adapter"],
            expose_headers=["X-Request-Id", "Retry-After"],
            allow_credentials=False,
        )
    app.add_middleware(DrainMiddleware, drain=runtime.drain)
    app.add_middleware(EdgeMiddleware, settings=settings)
