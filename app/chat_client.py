"""`guardchat chat`: a terminal chat against a running server, streaming answers over SSE."""

from __future__ import annotations

import json

import httpx
from rich.console import Console


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _stream_turn(
    client: httpx.Client, messages: list[dict[str, str]], session_id: str | None, console: Console
) -> tuple[str, dict]:
    body: dict = {"model": "guardchat", "messages": messages, "stream": True}
    if session_id:
        body["session_id"] = session_id
    answer: list[str] = []
    meta: dict = {}
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            try:
                msg = resp.json()["error"]["message"]
            except Exception:
                msg = resp.text
            raise RuntimeError(f"{resp.status_code}: {msg}")
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            payload = json.loads(data)
            if "error" in payload:
                raise RuntimeError(payload["error"]["message"])
            delta = payload["choices"][0]["delta"].get("content") or ""
            console.print(delta, end="", markup=False, highlight=False)
            answer.append(delta)
            meta = payload.get("guardchat", meta)
    console.print()
    return "".join(answer), meta


def run_terminal_chat(url: str, *, api_key: str | None = None, stateless: bool = False) -> None:
    console = Console()
    with httpx.Client(base_url=url.rstrip("/"), headers=_headers(api_key), timeout=300) as client:
        session_id = None
        if not stateless:
            r = client.post("/api/sessions")
            r.raise_for_status()
            session_id = r.json()["id"]
        console.print(f"[dim]guardchat at {url} — session {session_id or '(stateless)'} — Ctrl-D to quit[/dim]")
        history: list[dict[str, str]] = []
        while True:
            try:
                text = console.input("[bold cyan]you>[/bold cyan] ")
            except (EOFError, KeyboardInterrupt):
                console.print()
                return
            if not text.strip():
                continue
            messages = (
                [{"role": "user", "content": text}] if session_id else [*history, {"role": "user", "content": text}]
            )
            console.print("[bold green]bot>[/bold green] ", end="")
            try:
                answer, meta = _stream_turn(client, messages, session_id, console)
            except (RuntimeError, httpx.HTTPError) as exc:
                console.print(f"[red]error: {exc}[/red]")
                continue
            if meta.get("blocked"):
                rails = [r["name"] for r in meta.get("rails", []) if r.get("verdict") in ("block", "error")]
                console.print(f"[yellow]blocked by: {', '.join(rails) or 'rails'}[/yellow]")
            for c in meta.get("citations", []):
                console.print(f"[dim]  [{c['id']}] {c['title']} ({c['source']})[/dim]")
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
