"""Sessions on a real Redis through the real HTTP server: persistence across a restart, ordering."""

from __future__ import annotations

import concurrent.futures

from tests.fixtures.server import LiveServer


def _turn(server: LiveServer, sid: str, text: str, stream: bool = False) -> int:
    body = {"model": "x", "messages": [{"role": "user", "content": text}], "stream": stream, "max_tokens": 12}
    with server.client() as c:
        if not stream:
            return c.post("/v1/chat/completions", json=body, headers={"X-Session-Id": sid}).status_code
        with c.stream("POST", "/v1/chat/completions", json=body, headers={"X-Session-Id": sid}) as r:
            for _ in r.iter_lines():
                pass
            return r.status_code


def test_history_persists_in_redis_across_turns_and_restart(base_settings, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    settings = base_settings.model_copy(update={"redis_url": redis_url})
    with LiveServer(settings) as first:
        with first.client() as c:
            sid = c.post("/api/sessions").json()["id"]
        assert _turn(first, sid, "How do I freeze my debit card in the app?") == 200
        assert _turn(first, sid, "And how do I unfreeze it?", stream=True) == 200
    # A brand-new process-equivalent: new app, new store object, same Redis.
    with LiveServer(settings) as second, second.client() as c:
        turns = c.get(f"/api/sessions/{sid}").json()["turns"]
        assert [t["user"] for t in turns] == ["How do I freeze my debit card in the app?", "And how do I unfreeze it?"]
        assert all(t["answer"] for t in turns)
        assert _turn(second, sid, "Thanks! What are your branch hours?") == 200
        assert len(c.get(f"/api/sessions/{sid}").json()["turns"]) == 3


def test_concurrent_turns_in_one_session_stay_ordered(base_settings, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    settings = base_settings.model_copy(update={"redis_url": redis_url})
    questions = [f"Question {i}: what is the fee for an outgoing domestic wire?" for i in range(4)]
    with LiveServer(settings) as server:
        with server.client() as c:
            sid = c.post("/api/sessions").json()["id"]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda q: _turn(server, sid, q, stream=q.endswith("?") and q[9] in "13"), questions))
        assert codes == [200] * 4
        with server.client() as c:
            turns = c.get(f"/api/sessions/{sid}").json()["turns"]
    assert sorted(t["user"] for t in turns) == sorted(questions)
    # Serialized: each turn loaded the history only after the previous turn was saved, never interleaved.
    assert [t["metadata"]["trace"]["history_turns"] for t in turns] == [0, 1, 2, 3]
    for t in turns:
        assert t["answer"] and t["metadata"]["session_id"] == sid
