"""Reads answer pages (app/rag/pages.py) into the embedded llama.cpp server's prompt cache while it is idle.

A page's head (the fixed instructions and the page) is read once here; afterwards every question the page
answers reads only its own tokens (llama.cpp restores the page's KV state from host memory, `cache_ram_mib`).
The pipeline asks `is_warm` before it builds a page prompt: a page not read yet would cost its whole length on the
customer's clock (~1,000 tokens: 40 s on a 2-core AVX2 machine), so such a turn gets the passages prompt and the
page moves to the front of the queue.

Warming never competes with a customer: it waits until no turn is running (`busy()`), and it reads a page in
steps of a few source blocks (each request extends the cached prefix of the one before), so a turn that starts
meanwhile shares the CPU with at most one short step. The warm pages are remembered in least-recently-used order
within the cache's measured size, so a page llama.cpp would have evicted is not assumed warm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import httpx

log = logging.getLogger("guardchat.llm")

STEP_TOKENS = 160  # read a page in steps of about this many tokens (a few source blocks)
SETTLE_S = 0.5  # quiet time after a turn before warming resumes
KV_BYTES_PER_TOKEN = 32 * 1024  # >= what a <= 1.5B model's f16 KV state takes per token (Qwen2.5-1.5B: 28 KiB)


@dataclass(frozen=True)
class WarmJob:
    key: str
    steps: tuple[str, ...]  # system-message texts, each extending the one before; the last is the whole head
    tokens: int  # approximate tokens of the whole head


class PageWarmer:
    """The warm-page bookkeeping and the background reader for one llama.cpp server."""

    def __init__(self, base_url: str, model: str, *, cache_mib: int, timeout_s: float = 900.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        # Half the cache: the other half keeps the customers' conversations (llama.cpp saves every prompt it
        # replaces there too, and evicts the least recently used, pages included).
        self.capacity_tokens = cache_mib * 1024 * 1024 // KV_BYTES_PER_TOKEN // 2
        self.timeout_s = timeout_s
        self._warm: OrderedDict[str, int] = OrderedDict()  # key -> tokens, least recently used first
        self._pending: OrderedDict[str, WarmJob] = OrderedDict()
        self._busy = 0
        self._last_busy = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    # ------------------------------------------------------------ what the pipeline asks

    def is_warm(self, key: str) -> bool:
        if key not in self._warm:
            return False
        self._warm.move_to_end(key)
        return True

    def want(self, job: WarmJob, *, first: bool = False) -> None:
        """Queues a page (`first`: before the others, a customer asked for it)."""
        if job.key in self._warm:
            return
        self._pending[job.key] = job
        if first:
            self._pending.move_to_end(job.key, last=False)
        self._wake.set()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Held for the length of a customer's turn: no warming starts meanwhile."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self._last_busy = time.monotonic()
            self._wake.set()

    def progress(self) -> dict[str, int]:
        return {"warm": len(self._warm), "pending": len(self._pending), "failures": self.failures}

    @property
    def idle(self) -> bool:
        """Nothing left to warm."""
        return not self._pending

    # ------------------------------------------------------------ the background reader

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="page-warmer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_until_warm(self, timeout_s: float) -> bool:
        """Waits until every queued page is warm (or failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return not self._pending

    async def _quiet(self) -> None:
        while self._busy or time.monotonic() - self._last_busy < SETTLE_S:
            self._wake.clear()
            if self._busy:
                await self._wake.wait()
            else:
                await asyncio.sleep(SETTLE_S)

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s) as client:
            while True:
                if not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                key, job = next(iter(self._pending.items()))
                try:
                    for step in job.steps:
                        await self._quiet()
                        await self._read(client, step)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a page that cannot be read stays cold; turns use passages
                    self.failures += 1
                    log.warning("could not warm answer page %s: %s", key, type(exc).__name__)
                else:
                    self._remember(key, job.tokens)
                self._pending.pop(key, None)
                if not self._pending:
                    log.info("answer pages: %d in the LLM's prompt cache (%d could not be read)",
                             len(self._warm), self.failures)  # fmt: skip

    async def _read(self, client: httpx.AsyncClient, system: str) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "?"}],
            "max_tokens": 1,
            "temperature": 0,
            "cache_prompt": True,
        }
        response = await client.post("/chat/completions", json=body)
        response.raise_for_status()

    def _remember(self, key: str, tokens: int) -> None:
        self._warm[key] = tokens
        self._warm.move_to_end(key)
        while sum(self._warm.values()) > self.capacity_tokens and len(self._warm) > 1:
            self._warm.popitem(last=False)


def warm_job(key: str, head: str, blocks: list[str], tokens: int, *, step_tokens: int = STEP_TOKENS) -> WarmJob:
    """The steps that read `head` + the source `blocks` (joined by blank lines) a few blocks at a time."""
    from app.rag.chain import approx_tokens

    steps: list[str] = []
    text, since = head, 0
    for i, block in enumerate(blocks):
        text = f"{text}{block}" if i == 0 else f"{text}\n\n{block}"
        since += approx_tokens(block)
        if since >= step_tokens or i == len(blocks) - 1:
            steps.append(text)
            since = 0
    return WarmJob(key, tuple(steps) or (head,), tokens)
