"""POST /v1/chat/completions: the OpenAI Chat Completions schema, plain and SSE."""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from app.api.deps import StateDep
from app.api.errors import APIError, error_body, exception_to_error
from app.api.schemas import ChatCompletionRequest
from app.api.security import check_message_limits, request_owner
from app.pipeline.turn import Delta, Done, TurnInputError, TurnRequest, TurnResult, TurnRunner
from app.state import AppState

router = APIRouter(tags=["chat"])


def _model_name(state: AppState) -> str:
    return state.llm.model_name or state.settings.llm_model or "guardchat"


def _pick_adapter(state: AppState, body: ChatCompletionRequest, header: str | None) -> str | None:
    """An adapter is chosen by the `X-Adapter` header or by naming it as `model`, from the allow-list."""
    allowed = set(state.settings.lora_adapter_names)
    if header:
        if header not in allowed:
            raise APIError(400, f"Unknown adapter {header!r}; allowed: {sorted(allowed) or 'none'}.", "invalid_adapter")
        return header
    if body.model and body.model in allowed:
        return body.model
    return None


def _turn_request(
    state: AppState,
    body: ChatCompletionRequest,
    session_id: str | None,
    adapter: str | None,
    request_id: str,
    owner: str | None,
) -> TurnRequest:
    if not body.messages:
        raise APIError(400, "`messages` must not be empty.", "empty_messages")
    try:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    except ValueError as exc:
        raise APIError(400, str(exc), "unsupported_content") from exc
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return TurnRequest(
        messages=messages,
        session_id=session_id,
        max_tokens=min(
            body.max_completion_tokens or body.max_tokens or state.settings.llm_max_tokens,
            state.settings.llm_max_tokens,
        ),
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        adapter=adapter,
        request_id=request_id,
        stream=body.stream,
        # A session continues only for the key that created it (404 otherwise, as if it did not exist); the
        # turn checks this in the same Redis round trip that locks the session and reads its history.
        owner=owner,
        check_owner=True,
    )


def _usage(result: TurnResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    state: StateDep,
    x_session_id: Annotated[str | None, Header(max_length=128)] = None,
    x_adapter: Annotated[str | None, Header()] = None,
    x_request_id: Annotated[str | None, Header(max_length=128)] = None,
) -> JSONResponse | EventSourceResponse:
    request_id = x_request_id or uuid.uuid4().hex
    session_id = x_session_id or body.session_id
    check_message_limits(body.messages, state.settings)  # hardening (issue 6): 413 naming the limit
    adapter = _pick_adapter(state, body, x_adapter)
    try:
        turn = _turn_request(state, body, session_id, adapter, request_id, request_owner(request))
    except TurnInputError as exc:
        raise APIError(400, str(exc), "invalid_messages") from exc
    runner = TurnRunner(state)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = _model_name(state)

    if not body.stream:
        try:
            result = await runner.run(turn)
        except TurnInputError as exc:
            raise APIError(400, str(exc), "invalid_messages") from exc
        body_json = _completion(result, completion_id, created, model)
        return JSONResponse(body_json, headers={"X-Request-Id": request_id})

    events = runner.events(turn)  # an async generator: closed explicitly by _sse
    # Pull the first event before answering, so errors that happen before any output (unknown session,
    # backend down, bad input) get a real HTTP status instead of an error inside a 200 stream.
    try:
        first = await anext(events)
    except TurnInputError as exc:
        raise APIError(400, str(exc), "invalid_messages") from exc
    chunk = functools.partial(_chunk, completion_id, created, model)
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return EventSourceResponse(
        _sse(first, events, chunk, include_usage), headers={"X-Request-Id": request_id, "Cache-Control": "no-cache"},
        ping=15,
    )


def _finish_reason(result: TurnResult) -> str:
    return result.finish_reason if result.finish_reason in ("stop", "length") else "stop"


def _completion(result: TurnResult, completion_id: str, created: int, model: str) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.answer},
                "finish_reason": _finish_reason(result),
            }
        ],
        "usage": _usage(result),
        "guardchat": result.guardchat(),
    }


def _chunk(
    completion_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any
) -> str:
    payload = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return json.dumps(payload, ensure_ascii=False)


async def _sse(
    first: Delta | Done, events: AsyncGenerator[Delta | Done, None], chunk: Callable[..., str], include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    yield {"data": chunk({"role": "assistant", "content": ""})}
    event: Delta | Done | None = first
    try:
        while event is not None:
            if isinstance(event, Delta):
                if event.text:
                    yield {"data": chunk({"content": event.text})}
            else:
                result = event.result
                extra: dict[str, Any] = {"guardchat": result.guardchat()}
                if include_usage:
                    extra["usage"] = _usage(result)
                yield {"data": chunk({}, _finish_reason(result), **extra)}
            event = await anext(events, None)
    except Exception as exc:  # mid-stream failure: an OpenAI-style error event, never a traceback
        status, message, code = exception_to_error(exc)
        yield {"data": json.dumps(error_body(status, message, code))}
    finally:
        # On a client disconnect this runs the turn's own cleanup now (cancel generation, save the
        # turn as interrupted) rather than whenever the generator is garbage-collected.
        await events.aclose()
    yield {"data": "[DONE]"}
