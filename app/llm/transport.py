"""The HTTP transport of the LLM client (app/llm/client.py) over aiohttp: JSON calls and SSE streams.

Why aiohttp and not httpx: every turn makes two Llama Guard calls and one streamed generation. Measured on
loopback (docs/benchmarks.md), an aiohttp POST costs ~0.2 ms of CPU against ~0.85 ms through httpx, and at
concurrency 32 the httpx pool made each Llama Guard call wait 100+ ms against ~10 ms here.

One pooled session per event loop (aiohttp binds a session to the loop that made it). Connection failures
are retried only before the response headers, so a request is never replayed once the backend started
answering and a stream is never retried mid-way; timeouts are not retried (a backend too slow once is likely
too slow again). The proxy from the environment is resolved once (aiohttp's `trust_env` would re-read it and
~/.netrc on every request). Every transport failure becomes a typed LLM error (app/llm/base.py) here, with
its wording in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import aiohttp
import orjson
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from app.llm.base import LLMError, LLMTimeout, LLMUnavailable
from app.observability import model_time


def _retryable(exc: BaseException) -> bool:
    # aiohttp's socket timeouts are connection errors too: those are timeouts, not retried.
    return isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(exc, asyncio.TimeoutError)


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTP(S)_PROXY minus NO_PROXY), as httpx would use it."""
    parts = urlsplit(url)
    proxy = getproxies().get(parts.scheme)
    if not proxy or proxy_bypass(parts.hostname or ""):
        return None
    return str(proxy)


class BackendTransport:
    """Requests with a JSON body; errors are the typed LLM errors of app/llm/base.py.

    `post` returns the whole body of a JSON call; `open` + `lines` + `finish` stream a response line by line.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str],
        timeout_s: float,
        connect_timeout_s: float,
        max_retries: int,
        status_error: Callable[[int, bytes], LLMError],
        redact: Callable[[str], str],
    ) -> None:
        self.base_url = base_url
        self.max_retries = max_retries
        self._headers = headers
        # sock_read bounds each wait for bytes (a stalled backend, also mid-stream), not the whole answer.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=timeout_s)
        self.connect_timeout_s = connect_timeout_s
        self._proxy = env_proxy(base_url)
        self._status_error = status_error
        self._redact = redact
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _current_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, limit_per_host=64),
                headers=self._headers,
                timeout=self._timeout,
                trust_env=False,
            )
            self._loop = loop
        return self._session

    async def open(
        self,
        method: str,
        url: str,
        body: dict[str, Any] | None,
        headers: dict[str, str],
        *,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> aiohttp.ClientResponse:
        """Send; return the response with its headers read and status checked, body not yet consumed.
        The caller must hand it to `read` or `finish`."""
        session = self._current_session()
        data = None if body is None else orjson.dumps(body)  # ~3x faster than json, and bytes already
        if data is not None:
            headers = {**headers, "Content-Type": "application/json"}
        timeout = timeout or self._timeout
        try:
            try:  # the first attempt outside tenacity: its retry state costs ~0.1 ms per call, and most calls succeed
                response = await session.request(
                    method, url, data=data, headers=headers, proxy=self._proxy, timeout=timeout
                )
            except Exception as exc:  # noqa: BLE001 - sorted below: retried, or mapped to our errors
                if self.max_retries < 1 or not _retryable(exc):
                    raise
                response = await self._retry(session, method, url, data, headers, timeout)
        except TimeoutError as exc:
            raise LLMTimeout(self._redact(f"LLM backend at {self.base_url} timed out ({type(exc).__name__})")) from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: aiohttp rejects a malformed URL
            raise LLMUnavailable(
                self._redact(f"cannot reach LLM backend at {self.base_url} ({type(exc).__name__}: {exc})")
            ) from exc
        if response.status >= 400:
            try:
                raw = await response.read()
            except (aiohttp.ClientError, TimeoutError):
                raw = b""
            finally:
                response.release()
            raise self._status_error(response.status, raw)
        return response

    async def _retry(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        data: bytes | None,
        headers: dict[str, str],
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        """The remaining `max_retries` attempts after a first one failed to connect, with backoff."""
        await asyncio.sleep(0.1)  # the backoff before the first retry, as wait_exponential would give it
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await session.request(
                    method, url, data=data, headers=headers, proxy=self._proxy, timeout=timeout
                )
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    async def read(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole body; the connection goes back to the pool."""
        try:
            return await response.read()
        except TimeoutError as exc:
            raise LLMTimeout(f"LLM backend at {self.base_url} timed out while answering") from exc
        except aiohttp.ClientError as exc:
            reason = type(exc).__name__
            raise LLMUnavailable(f"LLM backend at {self.base_url} dropped the connection ({reason})") from exc
        finally:
            response.release()

    async def post(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
        with model_time.span():
            return await self.read(await self.open("POST", url, body, headers))

    async def lines(self, response: aiohttp.ClientResponse) -> AsyncGenerator[str, None]:
        """The body's lines without their line ending, as they arrive. One await per network read, not per
        line: a token's SSE event is two lines, and readline() costs a coroutine each."""
        content = response.content
        rest = b""
        try:
            while chunk := await content.readany():
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    yield line.removesuffix(b"\r").decode("utf-8", "replace")
        except TimeoutError as exc:
            raise LLMTimeout(f"LLM backend at {self.base_url} stalled mid-stream") from exc
        except aiohttp.ClientError as exc:
            raise LLMUnavailable(f"LLM stream from {self.base_url} was interrupted ({type(exc).__name__})") from exc
        if rest:
            yield rest.removesuffix(b"\r").decode("utf-8", "replace")

    @staticmethod
    def finish(response: aiohttp.ClientResponse) -> None:
        """A body read to its end leaves its connection in the pool; otherwise (the stream was abandoned:
        client gone, blocked answer) the connection is closed, which is what makes the backend stop
        generating."""
        if response.content.is_eof():
            response.release()
        else:
            response.close()

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is None or session.closed:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self._loop:  # a session can only be closed on its own loop
            await session.close()
