"""A local HTTP server speaking the OpenAI protocol of the GPU-only backends (trtllm-serve's chat
completions, Llama Guard 3 behind /v1/completions) that records every request's headers and body.
Used to check what reaches a backend; not a model."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ANSWER = "You can order a replacement card in the app under Cards."


class Recorder:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def record(self, path: str, headers: dict[str, str], body: Any) -> None:
        with self.lock:
            self.requests.append({"path": path, "headers": headers, "body": body})

    def for_path(self, suffix: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"].endswith(suffix)]


def _handler(recorder: Recorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _json(self, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            recorder.record(self.path, {k.lower(): v for k, v in self.headers.items()}, None)
            if self.path.endswith("/models"):
                self._json({"object": "list", "data": [{"id": "recorded", "object": "model"}]})
            else:
                self._json({"status": "ok"})

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            recorder.record(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            created = int(time.time())
            if self.path.endswith("/completions") and "/chat/" not in self.path:
                # Llama Guard 3 answers `safe` or `unsafe\nS1,S2` to its raw prompt.
                self._json({"id": "cmpl-1", "object": "text_completion", "created": created, "model": body["model"],
                            "choices": [{"index": 0, "text": "safe", "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101}})
                return
            if not body.get("stream"):
                self._json({"id": "chatcmpl-1", "object": "chat.completion", "created": created,
                            "model": body["model"],
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 50, "completion_tokens": 12, "total_tokens": 62}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": created, "model": body["model"]}
            for word in ANSWER.split(" "):
                chunk = {**base, "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            done = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            usage = {**base, "choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 12,
                                                      "total_tokens": 62}}
            self.wfile.write(f"data: {json.dumps(done)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()
            self.close_connection = True

    return Handler


@contextmanager
def recording_backend() -> Iterator[tuple[str, Recorder]]:
    """Yields (base URL ending in /v1, recorder)."""
    recorder = Recorder()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(recorder))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", recorder
    finally:
        server.shutdown()
        server.server_close()
