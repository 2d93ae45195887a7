"""Local HTTP servers for the LLM client tests: stand-ins that speak a wire protocol exactly.

Only GPU-only servers (trtllm-serve, NIM) and misbehaving servers (slow, junk) are stood in; every test that
needs a model talks to the real embedded llama.cpp server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fixtures.threaded import free_port, serve_in_thread


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class WireServer:
    url: str  # root, e.g. http://127.0.0.1:PORT
    requests: list[Recorded] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def last(self, path: str) -> Recorded:
        return [r for r in self.requests if r.path == path][-1]


Handler = Callable[[Request, Any], Awaitable[Response]]


@contextmanager
def serve(routes: dict[tuple[str, str], Handler]) -> Iterator[WireServer]:
    """Run `{(method, path): handler(request, json_body)}` with uvicorn on 127.0.0.1 in a thread."""
    port = free_port()
    server_info = WireServer(url=f"http://127.0.0.1:{port}")

    def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode()
            headers = {k.lower(): v for k, v in request.headers.items()}
            server_info.requests.append(Recorded(request.method, request.url.path, headers, body))
            return await handler(request, body)

        return run

    app = Starlette(routes=[Route(path, endpoint(h), methods=[method]) for (method, path), h in routes.items()])
    with serve_in_thread(app, port):
        yield server_info


# ---------------------------------------------------------------- OpenAI wire helpers


def chat_response(content: str, model: str, finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


def sse(chunks: list[str], *, finish: bool = True, done: bool = True, pings: bool = True) -> list[str]:
    """OpenAI chat.completion.chunk events for `chunks`, optionally with ': ping' keep-alives."""
    events = []
    for text in chunks:
        if pings:
            events.append(": ping\n\n")
        payload = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
        events.append(f"data: {json.dumps(payload)}\n\n")
    if finish:
        payload = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        events.append(f"data: {json.dumps(payload)}\n\n")
        usage = {"prompt_tokens": 11, "completion_tokens": len(chunks), "total_tokens": 11 + len(chunks)}
        events.append(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n")
    if done:
        events.append("data: [DONE]\n\n")
    return events


def stream_response(events: list[str], *, delay_after: int | None = None, delay_s: float = 0.0) -> StreamingResponse:
    """Stream `events`; after `delay_after` events, stall for `delay_s` (a backend that hangs mid-answer)."""

    async def generate() -> Any:
        for index, event in enumerate(events):
            if delay_after is not None and index == delay_after:
                await asyncio.sleep(delay_s)
            yield event

    return StreamingResponse(generate(), media_type="text/event-stream")


def trtllm_routes(model: str) -> dict[tuple[str, str], Handler]:
    """trtllm-serve: GET /health (empty 200), GET /v1/models, chat and completions with optional lora_request."""

    async def health(request: Request, body: Any) -> Response:
        return Response(status_code=200)

    async def models(request: Request, body: Any) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "tensorrt_llm"}]})

    async def chat(request: Request, body: Any) -> Response:
        lora = body.get("lora_request") or {}
        content = f"answer via {lora.get('lora_name', 'base')}"
        if body.get("stream"):
            return stream_response(sse([content[:6], content[6:]]))
        return JSONResponse(chat_response(content, body["model"]))

    return {("GET", "/health"): health, ("GET", "/v1/models"): models, ("POST", "/v1/chat/completions"): chat}


def nim_routes(served_models: list[str]) -> dict[tuple[str, str], Handler]:
    """NIM / vLLM: every loaded LoRA adapter is a model id; an unknown model is a 404 OpenAI error."""

    async def models(request: Request, body: Any) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model"} for m in served_models]})

    async def chat(request: Request, body: Any) -> Response:
        if body["model"] not in served_models:
            error = {"message": f"The model `{body['model']}` does not exist.", "type": "NotFoundError", "code": 404}
            return JSONResponse({"error": error}, status_code=404)
        return JSONResponse(chat_response(f"served by {body['model']}", body["model"]))

    return {("GET", "/v1/models"): models, ("POST", "/v1/chat/completions"): chat}


def fixed(status: int, content: str | dict[str, Any], media_type: str = "application/json") -> Handler:
    async def handler(request: Request, body: Any) -> Response:
        if isinstance(content, dict):
            return JSONResponse(content, status_code=status)
        return PlainTextResponse(content, status_code=status, media_type=media_type)

    return handler


def slow(delay_s: float) -> Handler:
    async def handler(request: Request, body: Any) -> Response:
        await asyncio.sleep(delay_s)
        return JSONResponse(chat_response("too late", "slow"))

    return handler
