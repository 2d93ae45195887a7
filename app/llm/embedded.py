"""The embedded llama.cpp server (xllamacpp) on loopback.

xllamacpp runs llama.cpp's own HTTP server in-process: OpenAI chat completions (plain and SSE),
/v1/completions, GBNF `grammar` in the request body, continuous batching over `n_parallel` slots and prompt
caching. We talk to it over HTTP with the same client as every remote backend, so the embedded and GPU
paths share one code path. The server stops when the `xllamacpp.Server` object is released.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from app.llm.speed import LLMSpeed

log = logging.getLogger(__name__)


def _all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class EmbeddedLLMServer:
    """llama.cpp serving one GGUF model on 127.0.0.1 at an ephemeral port.

    `ctx_size` is the context of ONE slot (one concurrent request); the KV cache holds
    `ctx_size * parallel` tokens, so every request gets the full `ctx_size` even when all slots are busy.
    `threads=0` uses every core this process may run on.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        model_name: str,
        ctx_size: int = 4096,
        threads: int = 0,
        parallel: int = 2,
        host: str = "127.0.0.1",
        port: int = 0,
        batch_size: int = 512,
        cache_reuse_tokens: int = 256,
        prompt_cache_ram_mib: int = 1024,
        slot_prompt_similarity: float = 0.5,
        log_verbosity: int = 0,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if parallel < 1 or ctx_size < 64:
            raise ValueError("parallel must be >= 1 and ctx_size >= 64")
        self.model_path = Path(model_path)
        self._model_name = model_name
        self.ctx_size = ctx_size
        self.threads = threads if threads > 0 else _all_cores()
        self.parallel = parallel
        self.host = host
        self.port = port
        self.batch_size = batch_size
        self.cache_reuse_tokens = cache_reuse_tokens
        self.prompt_cache_ram_mib = prompt_cache_ram_mib
        self.slot_prompt_similarity = slot_prompt_similarity
        self.log_verbosity = log_verbosity
        self.startup_timeout_s = startup_timeout_s
        self._server: Any = None
        self._root_url: str | None = None
        self.speed: LLMSpeed | None = None  # measured once after startup (app/llm/speed.py), None until then
        self._close_hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------ properties

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def root_url(self) -> str:
        """http://127.0.0.1:PORT (llama.cpp's own /health, /props, /metrics live here)."""
        if self._root_url is None:
            raise RuntimeError("the embedded LLM server is not running")
        return self._root_url

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, http://127.0.0.1:PORT/v1."""
        return self.root_url + "/v1"

    # ------------------------------------------------------------ lifecycle

    def _params(self) -> Any:
        import xllamacpp  # imported lazily: loading the extension is only needed when serving

        params = xllamacpp.CommonParams()
        params.model.path = str(self.model_path)
        params.model_alias = {self._model_name}
        params.hostnames = [self.host]
        params.port = self.port
        params.n_parallel = self.parallel
        params.n_ctx = self.ctx_size * self.parallel
        params.kv_unified = False
        params.n_batch = self.batch_size
        params.cpuparams.n_threads = self.threads
        params.cpuparams_batch.n_threads = self.threads
        params.cont_batching = True
        # Prompt caching: keep each slot's KV after a request, route a new request to the slot with the most
        # similar prompt, and reuse shifted chunks of it; evicted prompts are kept in host RAM.
        params.cache_prompt = True
        params.n_cache_reuse = self.cache_reuse_tokens
        params.cache_ram_mib = self.prompt_cache_ram_mib
        # A slot is reused in place only when its prompt is most of the new one (a follow-up in the same
        # conversation); otherwise the new request looks in the prompt cache. llama.cpp's 0.1 reused a slot that
        # held a short prompt sharing only the system prompt (a question about the conversation) and never looked:
        # the next answer page was read again in full, ~1,000 tokens (40 s on a 2-core AVX2 machine).
        params.slot_prompt_similarity = self.slot_prompt_similarity
        params.use_jinja = True  # the GGUF's own chat template
        params.ui = False
        params.endpoint_metrics = True
        params.verbosity = self.log_verbosity
        return params

    def start(self) -> EmbeddedLLMServer:
        """Load the model and start serving (blocks for the load, seconds). Idempotent."""
        with self._lock:
            if self._server is not None:
                return self
            if not self.model_path.is_file():
                raise FileNotFoundError(f"model file {self.model_path} does not exist")
            import xllamacpp

            started = time.monotonic()
            try:
                server = xllamacpp.Server(self._params())
            except RuntimeError as exc:
                raise RuntimeError(f"llama.cpp could not start with {self.model_path}: {exc}") from exc
            self._server = server
            self._root_url = str(server.listening_address).rstrip("/")
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        log.info(
            "embedded LLM %s serving at %s (%d slots x %d ctx, %d threads) in %.1fs",
            self._model_name,
            self.base_url,
            self.parallel,
            self.ctx_size,
            self.threads,
            time.monotonic() - started,
        )
        return self

    def _wait_ready(self) -> None:
        # xllamacpp returns once the HTTP server listens; /health answers 503 until the model is loaded.
        deadline = time.monotonic() + self.startup_timeout_s
        last = "no answer"
        with httpx.Client(timeout=5.0) as http:
            while time.monotonic() < deadline:
                try:
                    response = http.get(self.root_url + "/health")
                    if response.status_code == 200:
                        return
                    last = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                time.sleep(0.1)
        raise RuntimeError(f"embedded LLM server not ready after {self.startup_timeout_s}s ({last})")

    async def astart(self) -> EmbeddedLLMServer:
        """start() off the event loop."""
        return await asyncio.to_thread(self.start)

    def on_close(self, hook: Callable[[], None]) -> None:
        """Run `hook` at close(), before llama.cpp is torn down. The teardown waits until the client of every open
        request has left, holding the GIL, so an in-process client still waiting for an answer (the speed probe)
        could never leave: it must cut its connection here, or close() does not return."""
        with self._lock:
            self._close_hooks.append(hook)

    def close(self) -> None:
        """Stop serving and free the model. Idempotent."""
        with self._lock:
            server, self._server, self._root_url = self._server, None, None
            hooks, self._close_hooks = self._close_hooks, []
        for hook in hooks:
            try:
                hook()
            except Exception:  # best effort: stopping the server matters more
                log.debug("close hook failed", exc_info=True)
        if server is not None:
            del server  # the Cython object's dealloc stops the HTTP server and frees llama.cpp
            gc.collect()
            log.info("embedded LLM %s stopped", self._model_name)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> EmbeddedLLMServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> EmbeddedLLMServer:
        return await self.astart()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
