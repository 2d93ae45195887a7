"""Instant (or fixed-latency) OpenAI-compatible backends for the benchmarks, as a plain ASGI app.

One app plays both GPU-only services the pipeline talks to:
- the chat LLM (trtllm-serve / NIM / vLLM): POST /v1/chat/completions, plain JSON or SSE;
- Llama Guard 3: POST /v1/completions with the raw Llama Guard prompt -> "safe".
NeMo Guardrails' built-in client asks every model through /v1/chat/completions, so a chat request whose
prompt is a Llama Guard or self-check prompt gets that check's answer ("safe" / "No") instead of the reply.

Run it in its own process (so it never shares a GIL with what is being measured):

    python -m bench.fake_backends --port 8101 [--ttft-ms 200 --itl-ms 20]

No framework on purpose: the backend must cost as close to nothing as possible (the benchmark floor).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# The reply of the "LLM": one output-rail window (< 200 chars), citing source [1] like the real prompt asks.
ANSWER = (
    "You can dispute a card transaction in Larkspur Mobile under Card > Dispute within 60 days of the "
    "statement date [1]. We may give you a provisional credit while we investigate [1]."
)
LLAMA_GUARD_MARKERS = ("<BEGIN UNSAFE CONTENT CATEGORIES>", "Provide your safety assessment")
SELF_CHECK_MARKERS = ("Should the user message be blocked", "Should the bot message be blocked")


# Source [1] of guardchat's RAG prompt: "[1] Title — Section" then its text, up to the next source.
_FIRST_SOURCE = re.compile(r"^\[1\] [^\n]*\n(.+?)(?=\n\n\[2\] |\Z)", re.DOTALL | re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def grounded_answer(prompt: str) -> str | None:
    """What a faithful RAG model answers: the first two sentences of source [1], each citing it. None when
    the prompt holds no sources (NeMo's setups, or a chat without RAG)."""
    match = _FIRST_SOURCE.search(prompt)
    if match is None:
        return None
    sentences = _SENTENCE_END.split(" ".join(match.group(1).split()))[:2]
    cited = [f"{s[:-1]} [1]{s[-1]}" if s[-1:] in ".!?" else f"{s} [1]." for s in sentences if s]
    return " ".join(cited) or None


def reply_for(prompt: str, repeat: int = 1, *, grounded: bool = False) -> str:
    """What a well-behaved deployment would answer: Llama Guard says safe, a self-check says No; the chat
    LLM answers ANSWER (about card disputes, whatever the question: unsupported by most retrieved sources,
    the groundedness rail's worst case) or, `grounded`, restates its first source."""
    if any(m in prompt for m in LLAMA_GUARD_MARKERS):
        return "safe"
    if any(m in prompt for m in SELF_CHECK_MARKERS):
        return "No"
    if grounded and (answer := grounded_answer(prompt)):
        return answer
    return " ".join([ANSWER] * repeat)


def tokens_of(text: str) -> list[str]:
    """Word-level "tokens" with their leading space, like a BPE stream."""
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


class FakeBackend:
    def __init__(
        self,
        ttft_ms: float = 0.0,
        itl_ms: float = 0.0,
        model: str = "fake-llm",
        repeat: int = 1,
        grounded: bool = False,
    ) -> None:
        self.repeat = repeat
        self.grounded = grounded
        self.ttft_s = ttft_ms / 1000
        self.itl_s = itl_ms / 1000
        self.model = model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path in ("/v1/models", "/health", "/healthz"):
            await _json(send, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
            return
        body = await _body(receive)
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            await _json(send, {"error": {"message": "bad json", "type": "invalid_request_error"}}, 400)
            return
        if method == "POST" and path == "/v1/completions":
            await self._completions(send, request)
        elif method == "POST" and path == "/v1/chat/completions":
            await self._chat(send, request)
        else:
            await _json(send, {"error": {"message": "not found", "type": "invalid_request_error"}}, 404)

    async def _completions(self, send: Send, request: dict[str, Any]) -> None:
        text = reply_for(str(request.get("prompt", "")))
        await _json(send, {
            "id": "cmpl-bench", "object": "text_completion", "created": int(time.time()),
            "model": request.get("model", self.model),
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 200, "completion_tokens": 1, "total_tokens": 201},
        })

    async def _chat(self, send: Send, request: dict[str, Any]) -> None:
        messages = request.get("messages") or []
        prompt = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        text = reply_for(prompt, self.repeat, grounded=self.grounded)
        model = request.get("model", self.model)
        usage = {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(tokens_of(text)),
                 "total_tokens": len(prompt) // 4 + len(tokens_of(text))}
        if not request.get("stream"):
            if self.ttft_s or self.itl_s:
                await asyncio.sleep(self.ttft_s + self.itl_s * (len(tokens_of(text)) - 1))
            await _json(send, {
                "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
            })
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))

        def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            payload = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        frames = [event({"role": "assistant", "content": ""})]
        frames += [event({"content": tok}) for tok in tokens_of(text)]
        tail = event({}, "stop") + (event({}, None, usage=usage) if include_usage else b"") + b"data: [DONE]\n\n"
        if not (self.ttft_s or self.itl_s):  # instant: everything in one write
            await send({"type": "http.response.body", "body": b"".join(frames) + tail, "more_body": False})
            return
        await asyncio.sleep(self.ttft_s)
        await send({"type": "http.response.body", "body": frames[0] + frames[1], "more_body": True})
        for frame in frames[2:]:
            await asyncio.sleep(self.itl_s)
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _json(send: Send, payload: dict[str, Any], status: int = 200) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def command(port: int, ttft_ms: float = 0.0, itl_ms: float = 0.0, repeat: int = 1, grounded: bool = False) -> list[str]:
    """The argv that starts one backend process (used by the benchmarks)."""
    from bench.common import PYTHON

    return [PYTHON, "-m", "bench.fake_backends", "--port", str(port),
            "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms), "--answer-repeat", str(repeat)] + (
        ["--grounded"] if grounded else [])


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    parser.add_argument("--answer-repeat", type=int, default=1, help="chat answer = ANSWER repeated N times")
    parser.add_argument("--grounded", action="store_true", help="answer by restating the prompt's source [1]")
    args = parser.parse_args()
    app = FakeBackend(args.ttft_ms, args.itl_ms, repeat=args.answer_repeat, grounded=args.grounded)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
