"""The request id of the current request, readable anywhere in its task tree (contextvars follow asyncio tasks)."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

REQUEST_ID_HEADER = "X-Request-Id"

current_request_id: ContextVar[str | None] = ContextVar("guardchat_request_id", default=None)

# A caller-supplied id is echoed into logs and backend headers, so it must be short and inert.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str:
    """The caller's X-Request-Id when it is a sane token, else a fresh one."""
    if value and _VALID_REQUEST_ID.match(value):
        return value
    return new_request_id()


def request_id_headers() -> dict[str, str]:
    """`{"X-Request-Id": id}` for an outgoing backend call made while serving a request, else `{}`."""
    rid = current_request_id.get()
    return {REQUEST_ID_HEADER: rid} if rid else {}
