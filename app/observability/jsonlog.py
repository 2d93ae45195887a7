"""Structured JSON logs: one object per line with the request id of the request being served.

Only our own fields are written; log messages never carry prompts or answers at INFO (the pipeline
logs ids, stages and verdicts), and anything that looks like a credential is masked as a last line
of defence.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from app.observability.context import current_request_id

_SECRET_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-]{6,}"),
    re.compile(r"(?i)((?:api[_-]?key|token|password|secret|authorization)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]{4,}"),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"),
)
# LogRecord attributes that are not user-supplied `extra=` fields.
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_HANDLER_MARK = "_guardchat_json"
QUIET_LIBRARIES = ("nemoguardrails", "httpx", "httpcore", "langchain", "sentence_transformers", "openai")


def redact(text: str) -> str:
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "[REDACTED]", text)
    return text


class RequestIdFilter(logging.Filter):
    """Stamps every record with the current request id (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
            "request_id": getattr(record, "request_id", None) or current_request_id.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in entry and not key.startswith("_"):
                entry[key] = value if isinstance(value, int | float | bool | type(None)) else redact(str(value))
        if record.exc_info:
            entry["exc_info"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


def json_handler(stream: Any = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    setattr(handler, _HANDLER_MARK, True)
    return handler


def configure_json_logging(level: str = "info", stream: Any = None) -> logging.Handler:
    """Routes the root logger and uvicorn's loggers through one JSON handler. Idempotent: a second call
    replaces the handler it installed before. uvicorn's own access log is silenced because the HTTP
    middleware writes a richer access line (route template, status, duration, request id)."""
    handler = json_handler(stream)
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, _HANDLER_MARK, False)] + [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    # Libraries that log request lines or whole prompts at INFO (NeMo Guardrails logs every event with the
    # user message): only from WARNING up unless the root level is DEBUG.
    for noisy in QUIET_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING)
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False
    return handler
