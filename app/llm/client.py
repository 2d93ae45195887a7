"""The one LLM client: OpenAI-compatible HTTP for trtllm-serve, NIM/vLLM and the embedded llama.cpp server.

Flavors differ only where the servers do:
- "embedded" (llama.cpp): GBNF `grammar` goes in the body; health = GET /v1/models.
- "openai" (NIM, vLLM, OpenAI): a LoRA adapter is selected by sending its name as `model`; health = /v1/models.
- "trtllm" (trtllm-serve): a LoRA adapter goes in the body as `lora_request` {lora_name, lora_int_id,
  lora_path}; health = GET <root>/health.

Errors are typed (app/llm/base.py). Connection failures are retried (tenacity) only before the response
headers arrive, so a request is never replayed once the backend started answering and a stream is never
retried mid-way.

Transport: aiohttp, one pooled session per event loop. Every turn makes three backend calls (Llama Guard on
the input, the LLM, Llama Guard on the answer); measured on loopback (bench), an aiohttp request costs
~0.2 ms of CPU against ~0.85 ms through httpx, and about half the wall time.

Streaming usage: `stream(..., on_usage=callback)` calls `callback(Usage)` when the server sends the final
usage chunk (we ask for it with `stream_options.include_usage`). A callback, not an attribute, because one
client serves many concurrent streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from app.llm.base import (
    Completion,
    GenerationOptions,
    LLMBadResponse,
    LLMError,
    LLMTimeout,
    LLMUnavailable,
    Usage,
)
from app.observability.context import current_request_id

log = logging.getLogger(__name__)

Flavor = Literal["openai", "trtllm", "embedded"]



def _retryable(exc: BaseException) -> bool:
    """Connection failures (refused, reset, closed without an answer). Retried only when raised before the
    response headers, so no response byte was consumed. Timeouts are not retried (aiohttp's socket timeouts
    are connection errors too): a backend that is too slow once is likely too slow again, and retrying would
    multiply the wait."""
    return isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(exc, asyncio.TimeoutError)

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
    """Implements app.llm.base.ChatBackend over a pooled aiohttp session (one per event loop)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        flavor: Flavor = "openai",
        timeout_s: float = 120,
        connect_timeout_s: float = 5,
        max_retries: int = 2,
        lora_adapters: Mapping[str, LoRAAdapter | str] | Iterable[str] | None = None,
    ) -> None:
        if flavor not in ("openai", "trtllm", "embedded"):
            raise ValueError(f"unknown LLM flavor {flavor!r}")
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")
        self.model_name = model
        self.flavor: Flavor = flavor
        self.max_retries = max(0, max_retries)
        self._api_key = api_key or None
        self._adapters = _normalize_adapters(lora_adapters)
        if flavor == "trtllm":
            pathless = [a.name for a in self._adapters.values() if not a.path]
            if pathless:
                raise ValueError(f"trtllm-serve needs a path for each LoRA adapter (name=path): {', '.join(pathless)}")
        self._headers_all = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        # sock_read bounds the wait for each read (a stalled stream), not the whole answer.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=timeout_s)
        self._connect_timeout_s = connect_timeout_s
        self._proxy = _env_proxy(self.base_url)
        self._http: aiohttp.ClientSession | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None

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
        response = await self._send("POST", self.base_url + "/chat/completions", body, options)
        try:
            async for delta in self._sse_deltas(response, on_usage):
                yield delta
        finally:
            response.release()  # closes the connection if the stream was not read to its end

    async def health(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=_HEALTH_TIMEOUT_S, sock_connect=min(_HEALTH_TIMEOUT_S, self._connect_timeout_s)
        )
        if self.flavor == "trtllm":
            response = await self._send("GET", self.root_url + "/health", None, None, timeout=timeout)
            response.release()
            return
        response = await self._send("GET", self.base_url + "/models", None, None, timeout=timeout)
        data = await self._read_json(response)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise LLMBadResponse("LLM backend /models answered without a `data` list")

    async def aclose(self) -> None:
        session, self._http = self._http, None
        if session is not None and not session.closed:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self._http_loop:  # a session can only be closed on its own loop
                await session.close()

    def _session(self) -> aiohttp.ClientSession:
        """The pooled session of the running event loop (created on first use: aiohttp binds a session to the
        loop it was made on, and tests or the CLI may drive one client from several loops in turn)."""
        loop = asyncio.get_running_loop()
        if self._http is None or self._http.closed or self._http_loop is not loop:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, limit_per_host=64),
                headers=self._headers_all,
                timeout=self._timeout,
                # Not trust_env: aiohttp would then re-read the proxy variables and ~/.netrc on every request
                # (~25% of a request's CPU here); the proxy is resolved once, in __init__.
                trust_env=False,
            )
            self._http_loop = loop
        return self._http

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
        if opts.grammar is not None and self.flavor == "embedded":
            body["grammar"] = opts.grammar  # llama.cpp only; OpenAI-style servers would reject the field
        if opts.adapter:
            self._apply_adapter(body, opts.adapter)
        body.update(opts.extra)
        return body

    def _apply_adapter(self, body: dict[str, Any], name: str) -> None:
        if self._adapters and name not in self._adapters:
            raise ValueError(f"LoRA adapter {name!r} is not configured for this backend")
        if self.flavor == "openai":
            body["model"] = name  # NIM / vLLM serve each loaded adapter as a model name
        elif self.flavor == "trtllm":
            adapter = self._adapters.get(name)
            if adapter is None:
                raise ValueError(f"LoRA adapter {name!r} has no path configured for trtllm-serve")
            body["lora_request"] = {"lora_name": adapter.name, "lora_int_id": adapter.int_id, "lora_path": adapter.path}
        else:
            log.warning("the embedded llama.cpp backend has no LoRA adapters; ignoring adapter %r", name)

    def _headers(self, options: GenerationOptions | None) -> dict[str, str]:
        # The turn's request id travels to every backend call (also the guard's), for log correlation.
        rid = (options.request_id if options is not None else None) or current_request_id.get()
        return {"X-Request-Id": rid} if rid else {}

    # ------------------------------------------------------------ transport

    async def _send(
        self,
        method: str,
        url: str,
        body: dict[str, Any] | None,
        options: GenerationOptions | None,
        *,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> aiohttp.ClientResponse:
        """Send and return the response with headers read and status checked; body not yet consumed."""
        session = self._session()
        headers = self._headers(options)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        response: aiohttp.ClientResponse | None = None
        try:
            async for attempt in retrying:
                with attempt:
                    response = await session.request(
                        method, url, data=data, headers=headers, timeout=timeout or self._timeout, proxy=self._proxy
                    )
        except TimeoutError as exc:
            raise LLMTimeout(self._redact(f"LLM backend at {self.base_url} timed out ({type(exc).__name__})")) from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # ValueError: aiohttp rejects a malformed URL. The backend is unreachable either way.
            raise LLMUnavailable(
                self._redact(f"cannot reach LLM backend at {self.base_url} ({type(exc).__name__}: {exc})")
            ) from exc
        assert response is not None  # AsyncRetrying either sent it or re-raised
        if response.status >= 400:
            try:
                detail = _error_detail(await response.read())
            except (aiohttp.ClientError, TimeoutError):
                detail = ""
            finally:
                response.release()
            raise self._status_error(response.status, detail)
        return response

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

    async def _read_json(self, response: aiohttp.ClientResponse) -> Any:
        try:
            raw = await response.read()
        except TimeoutError as exc:
            raise LLMTimeout(f"LLM backend at {self.base_url} timed out while answering") from exc
        except aiohttp.ClientError as exc:
            reason = type(exc).__name__
            raise LLMUnavailable(f"LLM backend at {self.base_url} dropped the connection ({reason})") from exc
        finally:
            response.release()
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise LLMBadResponse(self._redact(f"LLM backend answered with invalid JSON: {_snippet(raw)}")) from exc

    async def _post_json(self, path: str, body: dict[str, Any], options: GenerationOptions | None) -> Any:
        response = await self._send("POST", self.base_url + path, body, options)
        return await self._read_json(response)

    def _first_choice(self, data: Any) -> dict[str, Any]:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LLMBadResponse(self._redact(f"LLM backend answered without choices: {_snippet(data)}"))
        return choices[0]

    async def _sse_deltas(
        self, response: aiohttp.ClientResponse, on_usage: Callable[[Usage], None] | None
    ) -> AsyncIterator[str]:
        """Parse `data: {...}` lines until `data: [DONE]`; skip comments/keep-alives; raise on error events."""
        event = "message"
        finished = False
        try:
            async for line in _lines(response.content):
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
                    return
                try:
                    chunk = json.loads(value)
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
        except TimeoutError as exc:
            raise LLMTimeout(f"LLM backend at {self.base_url} stalled mid-stream") from exc
        except aiohttp.ClientError as exc:
            raise LLMUnavailable(f"LLM stream from {self.base_url} was interrupted ({type(exc).__name__})") from exc
        if not finished:
            raise LLMUnavailable(f"LLM stream from {self.base_url} ended before the answer was finished")

    def _redact(self, message: str) -> str:
        return message.replace(self._api_key, "***") if self._api_key else message


# ------------------------------------------------------------ response helpers


def _env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTP(S)_PROXY, minus NO_PROXY), as httpx and the openai SDK
    would use it; None for a direct connection."""
    parts = urlsplit(url)
    proxy = getproxies().get(parts.scheme)
    if not proxy or proxy_bypass(parts.hostname or ""):
        return None
    return str(proxy)


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The body's lines as they arrive, any length (LF or CRLF; servers built on sse-starlette send CRLF).
    Split as bytes, so a UTF-8 character cut between two reads is decoded whole."""
    buffer = b""
    async for data in content.iter_any():
        *lines, buffer = (buffer + data).split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", "replace")
    if buffer.rstrip(b"\r"):
        yield buffer.rstrip(b"\r").decode("utf-8", "replace")


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
