"""Fuzzing: schemathesis against our own OpenAPI schema (bounded), and a table of hostile inputs.
Never a 5xx, never a traceback, always an OpenAI-style error body."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.fixtures.server import LiveServer
from tests.hardening.conftest import assert_openai_error, bearer

FUZZ_KEY = bearer("key-fuzz")
# Generation that reaches the real LLM costs seconds per example on CPU; a few examples per operation still
# exercise every parameter's schema, and negative (schema-violating) examples never reach the model.
EXAMPLES_PER_OPERATION = 4


def test_no_server_errors_anywhere(secured_live: LiveServer) -> None:
    """Every operation of our schema, positive and negative examples, with a chat key (so admin routes and
    knowledge writes answer 403 and nothing is published or uploaded)."""
    schema = schemathesis.openapi.from_url(f"{secured_live.url}/openapi.json", headers=FUZZ_KEY)
    failures: list[str] = []
    calls = 0

    def fuzz(operation: Any, mode: GenerationMode) -> None:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case: Any) -> None:
            nonlocal calls
            calls += 1
            response = case.call(base_url=secured_live.url, headers=FUZZ_KEY, timeout=120)
            problem = _problem(response)
            if problem:
                failures.append(f"{case.method} {case.path} ({mode.value}): {problem}")

        try:
            run()
        except Unsatisfiable:  # nothing in the operation can be made invalid (e.g. no parameters)
            assert mode is GenerationMode.NEGATIVE, operation.path

    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(result.ok(), mode)
    assert calls >= 22, calls
    assert not failures, "\n".join(failures[:20])


def _problem(response: Any) -> str | None:
    text = response.text
    if response.status_code >= 500:
        return f"{response.status_code}: {text[:300]}"
    if "Traceback" in text:
        return "traceback in the body"
    if response.status_code >= 400 and "json" in response.headers.get("content-type", [""])[0]:
        error = response.json().get("error")
        if not isinstance(error, dict) or not {"message", "type", "code"} <= set(error):
            return f"not an OpenAI-style error: {text[:300]}"
    return None


def _nested(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


BAD_BODIES: list[tuple[str, bytes, int | None]] = [
    ("invalid utf-8", b'{"messages":[{"role":"user","content":"\xff\xfe\xc3\x28"}]}', None),
    ("truncated json", b'{"messages":[{"role":"user","content":"hi"', None),
    ("deeply nested array", _nested(50_000), None),
    ("deeply nested in content", b'{"messages":[{"role":"user","content":' + _nested(5_000) + b"}]}", None),
    ("nested objects", b'{"a":' * 20_000 + b"1" + b"}" * 20_000, None),
    ("huge body", b'{"messages":[{"role":"user","content":"' + b"A" * 1_200_000 + b'"}]}', 413),
    ("nul byte in content", json.dumps({"messages": [{"role": "user", "content": "hi\u0000there"}]}).encode(), 400),
    ("nul byte in role", json.dumps({"messages": [{"role": "us\u0000er", "content": "hi"}]}).encode(), None),
    (
        "nul byte in session id",
        json.dumps({"messages": [{"role": "user", "content": "x"}], "session_id": "a\u0000b"}).encode(),
        404,
    ),
    ("10k-message history", json.dumps({"messages": [{"role": "user", "content": "hi"}] * 10_000}).encode(), 413),
    ("messages is a string", b'{"messages":"hello"}', None),
    ("not an object", b"[1,2,3]", None),
    ("empty body", b"", None),
    ("huge number", b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":' + b"9" * 5000 + b"}", None),
    ("lone surrogate", b'{"messages":[{"role":"user","content":"\\ud800"}]}', 400),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/checks"])
@pytest.mark.parametrize(("name", "body", "status"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_gets_a_clean_4xx(
    secured_live: LiveServer, path: str, name: str, body: bytes, status: int | None
) -> None:
    headers = {**bearer("key-bad-input"), "Content-Type": "application/json"}
    with httpx.Client(base_url=secured_live.url, timeout=60) as client:
        response = client.post(path, content=body, headers=headers)
    if path == "/v1/checks" and status in (404,):
        status = None  # /v1/checks has no sessions
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
    assert_openai_error(response, status or response.status_code)
