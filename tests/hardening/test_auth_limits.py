"""Auth, roles, session ownership and request limits against a real keyed server (real LLM, rails, index)."""

from __future__ import annotations

import asyncio
import json
import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import httpx
import pytest

from app.api import security
from app.api.security import UI_CSP, KeyRing, ensure_admin_token, hash_key, warn_if_exposed
from app.main import create_app
from app.settings import Settings
from tests.fixtures.server import LiveServer
from tests.hardening.conftest import ADMIN_TOKEN, RATE_LIMIT_PER_MINUTE, assert_openai_error, bearer

ALICE, BOB = bearer("key-alice"), bearer("key-bob")
USER_MESSAGE = {"role": "user", "content": "How do I reset my online banking password?"}


def test_api_needs_a_key_health_does_not(secured_live: LiveServer) -> None:
    with secured_live.client() as client:
        for method, path in (("GET", "/v1/models"), ("POST", "/api/sessions"), ("POST", "/v1/chat/completions")):
            missing = client.request(method, path, json={"messages": [USER_MESSAGE]})
            assert_openai_error(missing, 401, "missing_api_key")
            assert missing.headers["www-authenticate"] == "Bearer"
            assert_openai_error(client.request(method, path, headers=bearer("key-mallory")), 401, "invalid_api_key")
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/v1/models", headers=ALICE).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Basic a2V5LWFsaWNl"}).status_code == 401


def test_key_comparison_visits_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time: the same number of compare_digest calls whether the first key, the last or none matches."""
    calls: list[int] = []
    real = security.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    ring = KeyRing(["first", "second", "third"], "the-admin")
    for token, kind in (("first", "chat"), ("third", "chat"), ("nobody", None), ("the-admin", "admin")):
        calls.clear()
        principal = ring.identify(token)
        assert (principal.kind if principal else None) == kind
        assert len(calls) == 4
        if principal is not None:
            assert principal.owner == hash_key(token) and token not in principal.owner


def test_chat_key_cannot_administer(secured_live: LiveServer) -> None:
    with secured_live.client() as client:
        assert_openai_error(client.get("/admin/api/rails", headers=ALICE), 403, "forbidden")
        assert client.get("/admin/api/rails").status_code == 401
        live = client.get("/admin/api/rails", headers=bearer(ADMIN_TOKEN))
        assert live.status_code == 200 and live.json()["files"]
        files = {"files": ("note.md", b"# Note\nHello.", "text/markdown")}
        assert_openai_error(client.post("/api/knowledge", headers=ALICE, files=files), 403, "forbidden")
        assert_openai_error(client.delete("/api/knowledge/anything", headers=ALICE), 403, "forbidden")
        assert client.get("/api/knowledge", headers=ALICE).status_code == 200  # reading is fine
        assert_openai_error(client.delete("/api/knowledge/anything", headers=bearer(ADMIN_TOKEN)), 404)


def test_uploads_cannot_escape_the_knowledge_dir(secured_live: LiveServer) -> None:
    knowledge_dir = secured_live.settings.knowledge_dir.resolve()
    before = {p for p in knowledge_dir.parent.rglob("*") if p.is_file()}
    names = ["../../escape-one.md", "..\\..\\escape-two.md", "/tmp/escape-three.md", "uploads/../../escape-four.md"]
    with secured_live.client() as client:
        files = [("files", (name, b"# Escape\nThe vault code is 1234.", "text/markdown")) for name in names]
        response = client.post("/api/knowledge", headers=bearer(ADMIN_TOKEN), files=files)
    assert response.status_code == 200, response.text
    created = {p for p in knowledge_dir.parent.rglob("*") if p.is_file()} - before
    created_outside_data = {p for p in created if not p.is_relative_to(secured_live.settings.data_dir)}
    assert created_outside_data, "the upload stored nothing"
    for path in created_outside_data:
        assert path.resolve().is_relative_to(knowledge_dir / "uploads"), path
    for result in response.json()["results"]:
        assert "/" not in result.get("saved_as", "uploads/x").removeprefix("uploads/")


def test_sessions_belong_to_the_key_that_created_them(secured_live: LiveServer) -> None:
    with secured_live.client() as client:
        created = client.post("/api/sessions", headers=ALICE)
        assert created.status_code == 201
        sid = created.json()["id"]
        info = asyncio.run(secured_live.app.state.guardchat.store.get(sid))
        assert info.owner == hash_key("key-alice")  # a hash, never the key

        # Alice's turn; it also asks for far more tokens than the cap (llm_max_tokens=24).
        turn = client.post(
            "/v1/chat/completions",
            headers={**ALICE, "X-Session-Id": sid},
            json={"messages": [USER_MESSAGE], "max_tokens": 100_000},
        )
        assert turn.status_code == 200, turn.text
        assert 0 < turn.json()["usage"]["completion_tokens"] <= secured_live.settings.llm_max_tokens
        turn_id = turn.json()["guardchat"]["turn_id"]

        assert_openai_error(client.get(f"/api/sessions/{sid}", headers=BOB), 404)
        feedback = {"value": 1}
        assert_openai_error(
            client.post(f"/api/sessions/{sid}/turns/{turn_id}/feedback", headers=BOB, json=feedback), 404
        )
        bob_turn = client.post(
            "/v1/chat/completions", headers={**BOB, "X-Session-Id": sid}, json={"messages": [USER_MESSAGE]}
        )
        assert_openai_error(bob_turn, 404, "session_not_found")
        assert_openai_error(client.delete(f"/api/sessions/{sid}", headers=BOB), 404)

        mine = client.get(f"/api/sessions/{sid}", headers=ALICE)
        assert mine.status_code == 200 and [t["id"] for t in mine.json()["turns"]] == [turn_id]
        assert (
            client.post(f"/api/sessions/{sid}/turns/{turn_id}/feedback", headers=ALICE, json=feedback).status_code
            == 200
        )
        assert client.delete(f"/api/sessions/{sid}", headers=ALICE).status_code == 204


def test_body_size_limit_answers_413_before_parsing(secured_live: LiveServer) -> None:
    limit = secured_live.settings.max_body_bytes
    not_even_json = b"{" * (limit + 1)
    with secured_live.client() as client:
        declared = client.post(
            "/v1/chat/completions", headers={**ALICE, "Content-Type": "application/json"}, content=not_even_json
        )
        error = assert_openai_error(declared, 413, "request_too_large")
        assert "max_body_bytes" in error["message"]

        def chunks():  # no Content-Length: chunked transfer encoding
            for start in range(0, len(not_even_json), 65536):
                yield not_even_json[start : start + 65536]

        chunked = client.post("/v1/checks", headers={**ALICE, "Content-Type": "application/json"}, content=chunks())
        assert_openai_error(chunked, 413, "request_too_large")


def test_message_limits_say_which_limit(secured_live: LiveServer) -> None:
    settings = secured_live.settings
    too_many = [{"role": "user", "content": "hi"}] * (settings.max_messages + 1)
    too_long = [{"role": "user", "content": "x" * (settings.max_message_chars + 1)}]
    with secured_live.client() as client:
        error = assert_openai_error(
            client.post("/v1/chat/completions", headers=ALICE, json={"messages": too_many}), 413
        )
        assert error["code"] == "too_many_messages" and "max_messages" in error["message"]
        error = assert_openai_error(
            client.post("/v1/chat/completions", headers=ALICE, json={"messages": too_long}), 413
        )
        assert error["code"] == "message_too_long" and "max_message_chars" in error["message"]
        checks_input = {"input": "x" * (settings.max_message_chars + 1)}
        assert_openai_error(client.post("/v1/checks", headers=ALICE, json=checks_input), 413, "message_too_long")


def test_rate_limit_per_key_with_retry_after(secured_live: LiveServer) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=secured_live.url, timeout=60) as client:
            semaphore = asyncio.Semaphore(16)

            async def one() -> httpx.Response:
                async with semaphore:
                    return await client.get("/v1/models", headers=bearer("key-ratelimit"))

            responses = await asyncio.gather(*(one() for _ in range(RATE_LIMIT_PER_MINUTE + 5)))
            responses.append(await client.get("/v1/models", headers=bearer("key-bob")))
            return list(responses)

    *limited, other_key = asyncio.run(burst())
    codes = [r.status_code for r in limited]
    assert codes.count(200) == RATE_LIMIT_PER_MINUTE and codes.count(429) == 5
    refused = next(r for r in limited if r.status_code == 429)
    assert_openai_error(refused, 429, "rate_limit_exceeded")
    assert 0 < int(refused.headers["retry-after"]) <= 60
    assert other_key.status_code == 200  # the limit is per key


class _Resources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str]] = []  # (directive, url)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script" and values.get("src"):
            self.urls.append(("script-src", str(values["src"])))
        if tag == "link" and values.get("href") and "stylesheet" in str(values.get("rel")):
            self.urls.append(("style-src", str(values["href"])))


def _csp_allows(csp: str, directive: str, url: str) -> bool:
    sources = dict((part.split()[0], part.split()[1:]) for part in (p.strip() for p in csp.split(";")) if part).get(
        directive, []
    )
    parts = urlsplit(url)
    if not parts.netloc:  # same origin
        return "'self'" in sources
    return any(s.rstrip("/") == f"{parts.scheme}://{parts.netloc}" for s in sources)


def test_security_headers_on_the_ui_and_api(secured_live: LiveServer) -> None:
    with secured_live.client() as client:
        page = client.get("/")
        api = client.get("/v1/models", headers=ALICE)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for response in (page, api):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    csp = page.headers["content-security-policy"]
    assert csp == UI_CSP
    # Gradio must still load: every script and stylesheet the page references is allowed by the policy,
    # and its inline bootstrap script needs 'unsafe-inline'.
    parser = _Resources()
    parser.feed(page.text)
    assert parser.urls, "the UI page references no scripts?"
    for directive, url in parser.urls:
        assert _csp_allows(csp, directive, url), (directive, url)
    if re.search(r"<script(?![^>]*\bsrc=)[^>]*>\s*\S", page.text):
        assert "'unsafe-inline'" in csp.split("script-src", 1)[1].split(";", 1)[0]


def _light_app(settings: Settings) -> httpx.AsyncClient:
    """The real app without its lifespan: enough for CORS and the docs switch, which act before any route."""
    app = create_app(settings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_cors_off_by_default_and_configurable() -> None:
    preflight = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"}

    async def probe(settings: Settings) -> httpx.Response:
        async with _light_app(settings) as client:
            return await client.options("/v1/chat/completions", headers=preflight)

    closed = asyncio.run(probe(Settings(ui_enabled=False)))
    assert "access-control-allow-origin" not in closed.headers
    opened = asyncio.run(probe(Settings(ui_enabled=False, cors_origins=["https://shop.example"])))
    assert opened.status_code == 200
    assert opened.headers["access-control-allow-origin"] == "https://shop.example"
    other = asyncio.run(probe(Settings(ui_enabled=False, cors_origins=["https://elsewhere.example"])))
    assert other.headers.get("access-control-allow-origin") != "https://shop.example"


def test_openapi_docs_can_be_switched_off() -> None:
    async def fetch(settings: Settings) -> list[int]:
        async with _light_app(settings) as client:
            return [(await client.get(path)).status_code for path in ("/openapi.json", "/docs", "/redoc")]

    assert asyncio.run(fetch(Settings(ui_enabled=False))) == [200, 200, 200]
    assert asyncio.run(fetch(Settings(ui_enabled=False, docs_enabled=False))) == [404, 404, 404]


def test_admin_token_generated_once_and_printed_once(capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(admin_token=None)
    token = ensure_admin_token(settings)
    assert len(token) >= 32 and settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == token
    assert ensure_admin_token(settings) == token
    assert capsys.readouterr().err.count(token) == 1
    configured = Settings(admin_token="from-env-token")
    assert ensure_admin_token(configured) == "from-env-token"
    assert "from-env-token" not in capsys.readouterr().err


def test_loud_warning_when_exposed_without_keys(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        assert warn_if_exposed(Settings(host="0.0.0.0")) is True
    assert "WITHOUT API KEYS" in caplog.text
    caplog.clear()
    assert warn_if_exposed(Settings(host="127.0.0.1")) is False
    assert warn_if_exposed(Settings(host="::1")) is False
    assert warn_if_exposed(Settings(host="0.0.0.0", api_keys=["k"])) is False
    assert not caplog.text


# --- the web chat shares the rate limit ----------------------------------------------------------------------


def _ui_join(client: httpx.Client, fn_index: int, data: list[object], session_hash: str) -> httpx.Response:
    """What Gradio's browser client posts to run one event (a chat turn, a new chat) of the chat at `/`."""
    body = {"data": data, "fn_index": fn_index, "session_hash": session_hash, "event_data": None}
    return client.post("/gradio_api/queue/join", json=body)


def _ui_result(client: httpx.Client, session_hash: str, event_id: str) -> dict[str, object]:
    """The event's `process_completed` message from the queue's result stream."""
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                    return dict(message)
    raise AssertionError("the queue closed before the event completed")


def test_web_chat_shares_the_rate_limit(base_settings: Settings) -> None:
    """Open mode (no keys): the UI's calls and the API's count against one budget per client address; the page,
    its config and assets stay outside the limit."""
    settings = base_settings.model_copy(update={"rate_limit": "4/minute", "redis_url": None})
    with LiveServer(settings) as server, server.client() as client:
        assert client.get("/").status_code == 200
        functions = {d["api_name"]: d["id"] for d in client.get("/config").json()["dependencies"]}
        hash_ = "ratelimit-test"
        turn = _ui_join(client, functions["respond"], ["What is the ATM withdrawal limit?", None, None, None], hash_)
        assert turn.status_code == 200, turn.text  # 1: a real turn through the UI
        result = _ui_result(client, hash_, turn.json()["event_id"])
        assert result["success"] is True, result
        assert client.get("/v1/models").status_code == 200  # 2
        assert _ui_join(client, functions["new_chat"], [], hash_).status_code == 200  # 3
        assert client.post("/api/sessions").status_code == 201  # 4
        refused = _ui_join(client, functions["respond"], ["And the daily transfer limit?", None, None, None], hash_)
        error = assert_openai_error(refused, 429, "rate_limit_exceeded")
        assert refused.json()["detail"] == error["message"]  # what Gradio's client shows the user
        assert 0 < int(refused.headers["retry-after"]) <= 60
        assert client.post("/gradio_api/run/respond", json={"data": []}).status_code == 429
        assert_openai_error(client.get("/v1/models"), 429, "rate_limit_exceeded")  # one budget for both
        for path in ("/", "/config", "/gradio_api/info"):
            assert client.get(path).status_code == 200, path
