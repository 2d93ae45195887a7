"""The LLM client: OpenAI-compatible HTTP. `OpenAICompatClient` speaks to NIM, vLLM and OpenAI itself (a LoRA
adapter is selected by sending its name as `model`; health = GET /v1/models). Servers that differ are small
subclasses that override only where they do: app/llm/trtllm.py (trtllm-serve: `lora_request`, GET <root>/health)
and app/llm/llamacpp.py (the embedded llama.cpp server or a llama-server: GBNF grammars, `Connection: close`,
continues a final assistant message). app/llm/factory.py `BACKENDS` maps GUARDCHAT_LLM_BACKEND to a class.

Errors are typed (app/llm/base.py). Every call, streams included, goes over one pooled aiohttp session
(app/llm/transport.py), which retries connection failures only before the response headers arrive, so a
request is never replayed once the backend started answering and a stream is never retried mid-way.

Streaming usage: `stream(..., on_usage=callback)` calls `callback(Usage)` when the server sends the final
usage chunk (we ask for it with `stream_options.include_usage`). A callback, not an attribute, because one
client serves many concurrent streams.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp
import orjson

from app.llm.base import (
    Completion,
    GenerationOptions,
    LLMBadResponse,
    LLMError,
    LLMTimeout,
    LLMUnavailable,
    Usage,
)
from app.llm.transport import BackendTransport
from app.observability import model_time
from app.observability.context import current_request_id

log = logging.getLogger(__name__)

_HEALTH_TIMEOUT_S = 10.0
_DETAIL_CHARS = 300


@dataclass(frozen=True)
class LoRAAdapter:
    """An adapter a request may select. `path`/`int_id` are what trtllm-serve needs to load it."""

    name: str
    path: str | None = None
    int_id: int = 0


def parse_lora_adapters(entries: Iterable[str]) -> dict[str, LoRAAdapter]:
    """Entries "name" or "name=/path/to/adapter" -> {name: LoRAAdapter}; lora_int_id = 1-based position."""
    adapters: dict[str, LoRAAdapter] = {}
    for position, entry in enumerate(entries, start=1):
        name, sep, path = entry.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"empty LoRA adapter name in {entry!r}")
        adapters[name] = LoRAAdapter(name=name, path=(path.strip() or None) if sep else None, int_id=position)
    return adapters


def _normalize_adapters(adapters: Mapping[str, LoRAAdapter | str] | Iterable[str] | None) -> dict[str, LoRAAdapter]:
    if adapters is None:
        return {}
    if isinstance(adapters, Mapping):
        result: dict[str, LoRAAdapter] = {}
        for position, (name, value) in enumerate(adapters.items(), start=1):
            result[name] = value if isinstance(value, LoRAAdapter) else LoRAAdapter(name, str(value), position)
        return result
    return parse_lora_adapters(adapters)


class OpenAICompatClient:
    """Implements app.llm.base.ChatBackend over one pooled aiohttp session (app/llm/transport.py)."""

    # A final assistant message is continued, not answered after (the second look's prefill, app/rag/second_look.py)
    continues_assistant: ClassVar[bool] = False
    accepts_grammar: ClassVar[bool] = False  # a GBNF `grammar` in the body; others would reject the field

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120,
        connect_timeout_s: float = 5,
        max_retries: int = 2,
        lora_adapters: Mapping[str, LoRAAdapter | str] | Iterable[str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")
        self.model_name = model
        self.max_retries = max(0, max_retries)
        self._api_key = api_key or None
        self._adapters = _normalize_adapters(lora_adapters)
        self._check_adapters()
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._http = BackendTransport(
            self.base_url,
            headers=headers,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_retries=self.max_retries,
            status_error=lambda status, raw: self._status_error(status, _error_detail(raw)),
            redact=self._redact,
        )

    @property
    def adapters(self) -> dict[str, LoRAAdapter]:
        return dict(self._adapters)

    # ------------------------------------------------------------ public API

    async def complete(self, messages: list[dict[str, str]], options: GenerationOptions | None = None) -> Completion:
        body = self._body(options, stream=False)
        body["messages"] = messages
        data = await self._post_json("/chat/completions", body, options)
        choice = self._first_choice(data)
        message = choice.get("message")
        if not isinstance(message, dict):
            raise LLMBadResponse("LLM backend answered without choices[0].message")
        return Completion(text=_as_text(message.get("content")), finish_reason=_finish(choice), usage=_usage(data))

    async def complete_prompt(self, prompt: str, options: GenerationOptions | None = None) -> Completion:
        body = self._body(options, stream=False)
        body["prompt"] = prompt
        data = await self._post_json("/completions", body, options)
        choice = self._first_choice(data)
        return Completion(text=_as_text(choice.get("text")), finish_reason=_finish(choice), usage=_usage(data))

    async def stream(
        self,
        messages: list[dict[str, str]],
        options: GenerationOptions | None = None,
        *,
        on_usage: Callable[[Usage], None] | None = None,
    ) -> AsyncIterator[str]:
        """Yield content deltas. `on_usage(Usage)` is called if the server reports usage at the end."""
        body = self._body(options, stream=True)
        body["messages"] = messages
        headers = self._headers(options) | self._stream_headers()
        started = time.perf_counter()
        response = await self._http.open("POST", self.base_url + "/chat/completions", body, headers)
        try:
            # aclosing: when our consumer stops early, the parsers stop now, not whenever they are collected.
            async with (
                aclosing(self._http.lines(response)) as lines,
                aclosing(self._sse_deltas(lines, on_usage)) as deltas,
            ):
                async for delta in deltas:
                    yield delta
        finally:
            self._http.finish(response)  # closes the connection if the stream was left mid-way
            model_time.record(started)

    async def health(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=_HEALTH_TIMEOUT_S, sock_connect=min(_HEALTH_TIMEOUT_S, self._http.connect_timeout_s)
        )
        raw = await self._http.read(await self._http.open("GET", self._health_url(), None, {}, timeout=timeout))
        self._check_health(raw)

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------ request building

    def _body(self, options: GenerationOptions | None, *, stream: bool) -> dict[str, Any]:
        opts = options or GenerationOptions()
        body: dict[str, Any] = {"model": self.model_name}
        for field in ("max_tokens", "temperature", "top_p", "stop"):
            value = getattr(opts, field)
            if value is not None:
                body[field] = value
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if opts.grammar is not None and self.accepts_grammar:
            body["grammar"] = opts.grammar
        if opts.adapter:
            self._apply_adapter(body, opts.adapter)
        body.update(opts.extra)
        return body

    def _apply_adapter(self, body: dict[str, Any], name: str) -> None:
        if self._adapters and name not in self._adapters:
            raise ValueError(f"LoRA adapter {name!r} is not configured for this backend")
        self._select_adapter(body, name)

    # ------------------------------------------------------------ where servers differ (subclasses override)

    def _check_adapters(self) -> None:
        """Raises ValueError when the configured adapters cannot be served."""

    def _select_adapter(self, body: dict[str, Any], name: str) -> None:
        body["model"] = name  # NIM / vLLM serve each loaded adapter as a model name

    def _stream_headers(self) -> dict[str, str]:
        return {}

    def _health_url(self) -> str:
        return self.base_url + "/models"

    def _check_health(self, raw: bytes) -> None:
        data = self._parse_json(raw)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise LLMBadResponse("LLM backend /models answered without a `data` list")

    def _headers(self, options: GenerationOptions | None) -> dict[str, str]:
        # The turn's request id travels to every backend call (also the guard's), for log correlation.
        rid = (options.request_id if options is not None else None) or current_request_id.get()
        return {"X-Request-Id": rid} if rid else {}

    # ------------------------------------------------------------ transport

    def _status_error(self, status: int, detail: str) -> LLMError:
        suffix = f": {detail}" if detail else ""
        kind: type[LLMError]
        if status in (401, 403):
            kind, what = LLMUnavailable, "rejected our credentials"
        elif status in (408, 504):
            kind, what = LLMTimeout, "timed out"
        elif status == 429 or status >= 500:
            kind, what = LLMUnavailable, "is unavailable"
        else:
            kind, what = LLMBadResponse, "rejected the request"
        return kind(self._redact(f"LLM backend {what} (HTTP {status}){suffix}"))

    async def _post_json(self, path: str, body: dict[str, Any], options: GenerationOptions | None) -> Any:
        return self._parse_json(await self._http.post(self.base_url + path, body, self._headers(options)))

    def _parse_json(self, raw: bytes) -> Any:
        try:
            return orjson.loads(raw)
        except ValueError as exc:
            raise LLMBadResponse(self._redact(f"LLM backend answered with invalid JSON: {_snippet(raw)}")) from exc

    def _first_choice(self, data: Any) -> dict[str, Any]:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LLMBadResponse(self._redact(f"LLM backend answered without choices: {_snippet(data)}"))
        return choices[0]

    async def _sse_deltas(
        self, lines: AsyncIterator[str], on_usage: Callable[[Usage], None] | None
    ) -> AsyncGenerator[str, None]:
        """Parse `data: {...}` lines until `data: [DONE]`; skip comments/keep-alives; raise on error events."""
        event = "message"
        finished = done = False
        async for line in lines:
            if done:
                # Read to the end of the body after [DONE] (normally nothing but the chunked terminator): an
                # unread response is closed, not pooled, and every turn then paid a new TCP connection.
                continue
            if not line:
                event = "message"  # blank line ends an SSE event
                continue
            if line.startswith(":"):
                continue  # comment / keep-alive ping
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value.strip()
                continue
            if field == "error":  # llama.cpp's non-standard error line
                raise LLMBadResponse(self._redact(f"LLM backend stream error: {_error_detail(value)}"))
            if field != "data":
                continue
            if value.strip() == "[DONE]":
                done = True
                continue
            try:
                chunk = orjson.loads(value)
            except ValueError as exc:
                raise LLMBadResponse(self._redact(f"invalid JSON in LLM stream: {_snippet(value)}")) from exc
            if event == "error" or (isinstance(chunk, dict) and "error" in chunk):
                raise LLMBadResponse(self._redact(f"LLM backend stream error: {_error_detail(value)}"))
            if not isinstance(chunk, dict):
                raise LLMBadResponse(self._redact(f"unexpected LLM stream chunk: {_snippet(value)}"))
            if chunk.get("usage") and on_usage is not None:
                on_usage(_usage(chunk))
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content") if isinstance(choice, dict) else None
                if isinstance(delta, str) and delta:
                    yield delta
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    finished = True
        if not finished and not done:
            raise LLMUnavailable(f"LLM stream from {self.base_url} ended before the answer was finished")

    def _redact(self, message: str) -> str:
        return message.replace(self._api_key, "***") if self._api_key else message


# ------------------------------------------------------------ response helpers


def _snippet(raw: Any) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return text[:_DETAIL_CHARS]


def _error_detail(raw: bytes | str) -> str:
    """The `error.message` of an OpenAI-style error body, else the start of the body."""
    try:
        data = json.loads(raw)
    except ValueError:
        return _snippet(raw).strip()
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:_DETAIL_CHARS]
    if isinstance(error, str):
        return error[:_DETAIL_CHARS]
    if isinstance(data, dict) and data.get("detail"):  # FastAPI-style servers (trtllm-serve validation errors)
        return str(data["detail"])[:_DETAIL_CHARS]
    return _snippet(raw).strip()


def _as_text(content: Any) -> str:
    if content is None:
        return ""
    if not isinstance(content, str):
        raise LLMBadResponse(f"LLM backend answered with non-text content: {_snippet(content)}")
    return content


def _finish(choice: dict[str, Any]) -> str:
    return str(choice.get("finish_reason") or "stop")


def _usage(data: Any) -> Usage:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return Usage()
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0), completion_tokens=int(usage.get("completion_tokens") or 0)
    )
