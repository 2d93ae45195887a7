"""The app factory: routers, error handlers, and the lifespan that builds the process state once."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

# Before anything can import NeMo Guardrails or a hub client: no telemetry, no hub.
os.environ.setdefault("NEMO_GUARDRAILS_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fastapi import FastAPI  # noqa: E402

from app import __version__  # noqa: E402
from app.api import admin, chat, checks, health, knowledge, search, sessions  # noqa: E402
from app.api.errors import install_error_handlers  # noqa: E402
from app.settings import Settings, get_settings  # noqa: E402
from app.state import AppState, LiveRails, LoadedRails  # noqa: E402

log = logging.getLogger("guardchat")

StateFactory = Callable[[Settings], Awaitable[AppState]]


async def build_state(settings: Settings) -> AppState:
    """Builds every long-lived component once: LLM (starting the embedded server when configured),
    session store, embedder, retriever, detector and the live rails."""
    from app.guard.detector import Detector, load_classifier
    from app.guard.rails import build_guard
    from app.llm.factory import build_chat_backend
    from app.rag.batching import BatchingEmbedder
    from app.rag.embedder import get_embedder
    from app.rag.grounding import CachedGroundingCheck
    from app.sessions.factory import build_session_store

    if settings.guard_fail_open:
        log.warning(
            "!" * 72 + "\nGUARDCHAT_GUARD_FAIL_OPEN is set: turns are ALLOWED when a guard cannot run. "
            "Development only — never in production.\n" + "!" * 72
        )
    llm, embedded_server = build_chat_backend(settings)
    store = build_session_store(settings)
    # One torch thread for the server's short query embeddings: with 2 threads on 2 cores, a query spun at
    # 84 ms p50 next to other work vs 16 ms with 1 (measured); throughput comes from batching instead.
    import torch

    torch.set_num_threads(1)
    # Concurrent turns' query embeddings share one forward pass; alone, a turn runs at once.
    embedder = BatchingEmbedder(get_embedder(threads=settings.embed_threads))
    detector = load_classifier(settings.guard_classifier, threads=settings.guard_threads)
    # The retrieval rail's injection filter scores chunks on the embeddings the index already stores: the
    # linear heads, which cost no encoder pass (the fine-tuned guard would read every chunk again).
    retriever = build_retriever(settings, embedder, detector if isinstance(detector, Detector) else Detector.load())
    grounding = CachedGroundingCheck(embedder)
    guard = build_guard(
        settings.rails_dir, settings, llm=llm, embedder=embedder, detector=detector, grounding=grounding
    )
    state = AppState(
        settings=settings,
        llm=llm,
        store=store,
        embedder=embedder,
        retriever=retriever,
        rails=LiveRails(LoadedRails(version="local", guard=guard)),
        query_embedder=query_embedder(detector, embedder),
        embedded_server=embedded_server,
        page_warmer=build_page_warmer(settings, embedded_server),
        detector=detector,
        grounding=grounding,
    )
    from app.admin.wiring import build_rails_publisher

    # Serves the live version from the versioned store (Redis or DATA_DIR) and follows publishes.
    await build_rails_publisher(state)
    from app.rag.shared_knowledge import start_shared_knowledge

    # With Redis: uploads and deletions made on any replica reach this one (and this one's reach the others).
    await start_shared_knowledge(state)
    return state


def query_embedder(detector: Any, embedder: Any) -> Any:
    """The guard model's shared pass embeds a turn's message (it reads the message anyway); None = `embedder`."""
    from app.guard.guard_model import GuardModel, SharedPassEmbedder

    if isinstance(detector, GuardModel) and detector.shares_embedding:
        return SharedPassEmbedder(detector, embedder)
    return None


def build_retriever(settings: Settings, embedder: Any, detector: Any) -> Any:
    if not settings.rag_enabled:
        return None
    import faiss

    from app.rag.filters import InjectionChunkFilter
    from app.rag.retrieve import HybridRetriever

    # One query at a time is searched: OpenMP threads only spin-wait against the rest of the turn
    # (measured at 10k vectors: p50 29.6 ms -> 0.33 ms under load; bench/faiss_bench.py).
    faiss.omp_set_num_threads(1)

    # The retrieval rail: retrieved chunks that try to instruct the model are dropped.
    return HybridRetriever(settings, chunk_filter=InjectionChunkFilter(detector, embedder))


def build_page_warmer(settings: Settings, embedded_server: Any) -> Any:
    """The answer pages' background reader (app/llm/page_warmer.py): with pages, the embedded LLM and warming on."""
    if settings.rag_context_mode != "pages" or embedded_server is None or not settings.rag_enabled:
        return None
    from app.llm.page_warmer import PageWarmer

    server = embedded_server
    return PageWarmer(server.base_url, server.model_name, cache_mib=settings.embedded_prompt_cache_mib)


def start_page_warmer(state: AppState, probe: threading.Thread | None) -> None:
    """Starts reading pages once the speed probe is done (it must time an idle server): every page with
    rag_warm_pages, else only those turns ask for."""
    warmer = state.page_warmer
    if warmer is None:
        return
    from app.pipeline.answer_pages import plan_warmup

    async def after_probe() -> None:
        while probe is not None and probe.is_alive():
            await asyncio.sleep(0.5)
        if state.settings.rag_warm_pages:
            plan_warmup(state, warmer)
        warmer.start()

    state.background.append(asyncio.create_task(after_probe(), name="page-warmer-start"))


async def close_state(state: AppState) -> None:
    for task in state.background:
        task.cancel()
    if state.page_warmer is not None:
        await state.page_warmer.stop()
    for follower in (state.rails_publisher, state.shared_knowledge):
        if follower is not None:
            await follower.stop()
    # The live guard's own clients too (its Llama Guard HTTP sessions).
    for closer in (state.llm.aclose, state.store.aclose, state.rails.current.guard.aclose):
        try:
            await closer()
        except Exception:  # best effort on shutdown
            log.debug("close failed", exc_info=True)
    if state.embedded_server is not None:
        state.embedded_server.close()


def create_app(settings: Settings | None = None, state_factory: StateFactory | None = None) -> FastAPI:
    settings = settings or get_settings()
    from app.sessions.factory import choose_redis_url

    # Settled here, before the rate limiter, the rails versions and the session store read it: "auto" must
    # mean the same Redis (or none) for all three. Logged at startup, once logging is configured.
    store_choice = choose_redis_url(settings.redis_url)
    settings.redis_url = store_choice.redis_url

    from app.api.security import SecurityRuntime, add_security
    from app.lifecycle import install_sigterm_drain
    from app.observability import add_observability, configure_observability, instrument_state

    runtime = SecurityRuntime(settings)  # what the security middleware reads at request time

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Logging is configured here, not at import: uvicorn applies its own logging config after the app object is
        # created, and would undo ours.
        configure_observability(settings)
        log.info(store_choice.note)
        await runtime.startup()  # admin token, exposure warning, rate limiter
        try:
            state = await (state_factory or build_state)(settings)
            app.state.guardchat = state
            # Startup leaves ~400k long-lived objects (torch, transformers, NeMo, the index). Every full garbage
            # collection would walk them all (120-300 ms on 2 cores: a stall for every request in flight), and
            # they live as long as the process: collect once, then move them out of the collector's reach.
            gc.collect()
            gc.freeze()
            from app.llm.speed import start_speed_probe  # after startup, in a thread: readiness does not wait

            probe = start_speed_probe(state.embedded_server, settings)
            start_page_warmer(state, probe)
            install_sigterm_drain(runtime.drain)
            instrument_state(state)  # store latency and LLM backend errors, measured without their code knowing
            try:
                yield
            finally:
                await close_state(state)
                gc.unfreeze()  # back to normal generations (tests start many apps in one process)
        finally:
            await runtime.shutdown()

    docs = settings.docs_enabled  # off: no OpenAPI schema or docs pages are ever routed (404)
    app = FastAPI(
        title="guardchat",
        version=__version__,
        description="A guardrailed RAG chat server with an OpenAI-compatible API.",
        lifespan=lifespan,
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    install_error_handlers(app)
    for router in (
        chat.router,
        checks.router,
        search.router,
        sessions.router,
        knowledge.router,
        admin.router,
        health.router,
    ):
        app.include_router(router)
    add_security(app, runtime)  # auth, limits, CORS, security headers, SIGTERM drain
    add_observability(app, settings)  # request ids, /metrics
    if settings.ui_enabled:
        from app.ui import mount_ui

        mount_ui(app, settings)  # last: the UI is mounted at "/" behind every API route
    return app
