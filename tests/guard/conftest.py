"""Fixtures for the guard tests.

- `llama_guard_server`: a local HTTP server speaking the OpenAI /v1/completions protocol the way a
  Llama Guard 3 deployment (vLLM / NIM) does. Llama Guard needs a GPU, so this is the one stand-in
  the project allows; each test queues the raw completions it should answer with and reads back the
  requests it received.
- `detector`: the classifier the server loads by default (the fine-tuned guard model).
- `embedded_guard`: the shipped rails/ config on real NeMo Guardrails, with the detector and the real
  embedded LLM (SmolLM2-135M on xllamacpp) as the stage-2 judge.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.guard.rails import RailsGuard, build_guard
from app.llm.client import OpenAICompatClient
from app.llm.llamacpp import LlamaCppClient
from app.settings import PROJECT_ROOT, Settings
from tests.fixtures.threaded import free_port, serve_in_thread

RAILS_DIR = PROJECT_ROOT / "rails"
GUARD_MODEL = "meta-llama/Llama-Guard-3-8B"


@dataclass
class CannedAnswer:
    text: str = "safe"
    status: int = 200
    delay_s: float = 0.0


@dataclass
class LlamaGuardStandIn:
    base_url: str
    answers: list[CannedAnswer] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def queue(self, *answers: CannedAnswer | str) -> None:
        self.answers.extend(CannedAnswer(a) if isinstance(a, str) else a for a in answers)

    def reset(self) -> None:
        self.answers.clear()
        self.requests.clear()


async def canned_reply(answer: CannedAnswer, body: dict[str, Any], kind: str, choice: dict[str, Any]) -> JSONResponse:
    """How a stand-in answers with `answer`: after its delay, an OpenAI-style error body for a non-200 status,
    else a `kind` ("text_completion", "chat.completion") response holding `choice`."""
    if answer.delay_s:
        await asyncio.sleep(answer.delay_s)
    if answer.status != 200:
        return JSONResponse({"error": {"message": "internal error", "type": "server_error"}}, answer.status)
    return JSONResponse(
        {
            "id": "cmpl-test",
            "object": kind,
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop", **choice}],
            "usage": {"prompt_tokens": 200, "completion_tokens": 3, "total_tokens": 203},
        }
    )


def _app(state: LlamaGuardStandIn) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        state.requests.append(body)
        answer = state.answers.pop(0) if state.answers else CannedAnswer("safe")
        return await canned_reply(answer, body, "text_completion", {"text": answer.text, "logprobs": None})

    return app


@pytest.fixture(scope="session")
def llama_guard_server() -> Iterator[LlamaGuardStandIn]:
    port = free_port()
    state = LlamaGuardStandIn(base_url=f"http://127.0.0.1:{port}/v1")
    with serve_in_thread(_app(state), port):
        yield state


@pytest.fixture
def lg(llama_guard_server: LlamaGuardStandIn) -> Iterator[LlamaGuardStandIn]:
    llama_guard_server.reset()
    yield llama_guard_server
    llama_guard_server.reset()


@pytest.fixture(scope="session")
def detector() -> Any:
    """The classifier the server loads by default (the fine-tuned guard)."""
    from app.guard.detector import load_classifier

    return load_classifier(Settings().guard_classifier)


def remote_settings(guard_url: str, **overrides: Any) -> Settings:
    return Settings(
        guard_backend="openai", guard_url=guard_url, guard_model=GUARD_MODEL, guard_timeout_s=2.0, **overrides
    )


@pytest_asyncio.fixture(scope="session")
async def remote_guard(
    llama_guard_server: LlamaGuardStandIn, embedder: Any, detector: Any
) -> AsyncIterator[RailsGuard]:
    """The shipped config in remote mode: Llama Guard over HTTP for input and output safety."""
    guard = await asyncio.to_thread(
        build_guard,
        RAILS_DIR,
        remote_settings(llama_guard_server.base_url),
        llm=_Unused(),  # type: ignore[arg-type]
        embedder=embedder,
        detector=detector,
    )
    yield guard
    await guard.aclose()


@pytest_asyncio.fixture(scope="session")
async def embedded_judge(embedded_llm_url: str) -> AsyncIterator[OpenAICompatClient]:
    client = LlamaCppClient(embedded_llm_url, "smollm2-135m", timeout_s=60)
    yield client
    await client.aclose()


@pytest_asyncio.fixture(scope="session")
async def embedded_guard(embedded_judge: OpenAICompatClient, embedder: Any, detector: Any) -> RailsGuard:
    settings = Settings(guard_backend="embedded", guard_timeout_s=60)
    return await asyncio.to_thread(
        build_guard, RAILS_DIR, settings, llm=embedded_judge, embedder=embedder, detector=detector
    )


class _Unused:
    """The chat LLM, which remote-mode guards must never call."""

    model_name = "unused"

    async def complete_prompt(self, prompt: str, options: Any = None) -> Any:
        raise AssertionError("the chat LLM was asked to judge in remote guard mode")
