"""Pure formatting for the chat UI: one turn -> the Markdown/HTML the Gradio Chatbot shows.

Everything here is a plain function of data (no Gradio, no I/O), so it is unit-tested in tests/ui/.
All text that came from a user, the model, a document or the rails is HTML-escaped before it is put
into markup: the Chatbot renders HTML, and an answer must never be able to inject any.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SNIPPET_CHARS = 600

# Gradio Chatbot "messages" format: {"role": "user"|"assistant", "content": str}
ChatMessage = dict[str, Any]


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True) if value is not None else ""


def _first(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = data.get(key)
        if value not in (None, ""):
            return value
    return None


def blocking_rails(rails: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rails whose verdict stopped the turn (a guard error blocks too: safety fails closed)."""
    return [r for r in rails if r.get("verdict") in ("block", "error")]


def block_badge_html(guardchat: Mapping[str, Any]) -> str:
    """A visible badge naming the rail(s) and categories that blocked the turn; empty when not blocked."""
    if not guardchat.get("blocked"):
        return ""
    parts = []
    for rail in blocking_rails(guardchat.get("rails") or []):
        name = str(rail.get("name") or "rail")
        categories = [str(c) for c in rail.get("categories") or []]
        label = name + (f" ({', '.join(categories)})" if categories else "")
        if rail.get("verdict") == "error":
            label += " – check could not run"
        parts.append(label)
    label = "; ".join(parts) if parts else "a rail"
    return f'<div class="gc-badge gc-blocked" role="status">Blocked by {_text(label)}</div>'


def _citation_title(citation: Mapping[str, Any], position: int) -> tuple[str, str]:
    number = _first(citation, "id", "index", "n", "number")
    marker = f"[{number}]" if isinstance(number, int) else f"[{position}]"
    title = _first(citation, "title", "source", "document_id") or "source"
    section = citation.get("section")
    if section and str(section) != str(title):
        title = f"{title} – {section}"
    return marker, str(title)


def citations_html(citations: Sequence[Mapping[str, Any]]) -> str:
    """Each cited source as an expandable <details> with its snippet."""
    if not citations:
        return ""
    items = []
    for position, citation in enumerate(citations, start=1):
        marker, title = _citation_title(citation, position)
        snippet = str(_first(citation, "snippet", "content", "text", "quote") or "")
        if len(snippet) > SNIPPET_CHARS:
            snippet = snippet[:SNIPPET_CHARS].rstrip() + "…"
        source = citation.get("source")
        source_line = f'<div class="gc-source">{_text(source)}</div>' if source and str(source) != title else ""
        items.append(
            f'<details class="gc-citation"><summary>{_text(marker)} {_text(title)}</summary>'
            f"{source_line}<blockquote>{_text(snippet) or '<em>no snippet</em>'}</blockquote></details>"
        )
    return '<div class="gc-citations"><div class="gc-label">Sources</div>' + "".join(items) + "</div>"


def _rails_rows(rails: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for rail in rails:
        cats = ", ".join(str(c) for c in rail.get("categories") or [])
        score = rail.get("score")
        latency = rail.get("latency_ms")
        rows.append(
            "<tr>"
            f"<td>{_text(rail.get('name'))}</td><td>{_text(rail.get('verdict'))}</td><td>{_text(cats)}</td>"
            f"<td>{_text(f'{score:.3f}' if isinstance(score, int | float) else '')}</td>"
            f"<td>{_text(f'{latency:.0f} ms' if isinstance(latency, int | float) else '')}</td>"
            f"<td>{_text(rail.get('detail') or '')}</td>"
            "</tr>"
        )
    head = "<tr><th>rail</th><th>verdict</th><th>categories</th><th>score</th><th>time</th><th>detail</th></tr>"
    return f'<table class="gc-rails">{head}{"".join(rows)}</table>' if rows else "<p>No rails ran.</p>"


def why_html(guardchat: Mapping[str, Any], trace: Mapping[str, Any] | None = None) -> str:
    """The "why?" toggle: which rails ran and decided what, stage timings and the turn's trace."""
    rails = list(guardchat.get("rails") or [])
    timings = guardchat.get("timings_ms") or {}
    timing_text = ", ".join(
        f"{name} {value:.0f} ms" for name, value in timings.items() if isinstance(value, int | float)
    )
    body = [_rails_rows(rails)]
    if timing_text:
        body.append(f'<p class="gc-timings">{_text(timing_text)}</p>')
    if trace:
        pretty = json.dumps(trace, indent=1, ensure_ascii=False, default=str)
        body.append(f"<pre class=\"gc-trace\">{_text(pretty)}</pre>")
    return f'<details class="gc-why"><summary>why?</summary>{"".join(body)}</details>'


def assistant_markdown(
    answer: str, guardchat: Mapping[str, Any] | None = None, trace: Mapping[str, Any] | None = None
) -> str:
    """The whole assistant bubble: badge (if blocked), the answer, citations, and the "why?" toggle.

    The answer itself stays Markdown (the model writes Markdown) but is HTML-escaped so it renders
    as text; the extras are HTML blocks separated by blank lines so Markdown leaves them alone.
    """
    parts = []
    if guardchat:
        badge = block_badge_html(guardchat)
        if badge:
            parts.append(badge)
    parts.append(escape_answer(answer))
    if guardchat:
        cites = citations_html(guardchat.get("citations") or [])
        if cites:
            parts.append(cites)
        parts.append(why_html(guardchat, trace))
    return "\n\n".join(p for p in parts if p)


def escape_answer(answer: str) -> str:
    """Markdown stays Markdown; raw HTML in the answer is shown as text, never rendered."""
    return html.escape(answer, quote=False)


def error_markdown(message: str) -> str:
    return f'<div class="gc-badge gc-error" role="alert">{_text(message)}</div>'


def turn_messages(turn: Mapping[str, Any]) -> list[ChatMessage]:
    """A stored `Turn` (as a dict) -> the user and assistant chat messages, as the chat showed them."""
    metadata = dict(turn.get("metadata") or {})
    trace = metadata.get("trace")
    guardchat = {k: v for k, v in metadata.items() if k != "trace"}
    guardchat.setdefault("blocked", bool(turn.get("blocked")))
    answer = str(turn.get("answer") or "")
    if turn.get("status") == "interrupted":
        answer += "\n\n*(interrupted)*"
    return [
        {"role": "user", "content": escape_answer(str(turn.get("user") or ""))},
        {"role": "assistant", "content": assistant_markdown(answer, guardchat, trace)},
    ]


def history_messages(turns: Iterable[Mapping[str, Any]]) -> tuple[list[ChatMessage], list[str | None]]:
    """Restores a session: the chat messages, and for each message the turn id (None for user messages)
    so thumbs up/down on message `i` reaches the right stored turn."""
    messages: list[ChatMessage] = []
    turn_ids: list[str | None] = []
    for turn in turns:
        messages += turn_messages(turn)
        turn_ids += [None, str(turn.get("id") or "") or None]
    return messages, turn_ids


def feedback_values(turns: Iterable[Mapping[str, Any]]) -> list[str | None]:
    """The Chatbot's `feedback_value` (one entry per assistant message) from the stored feedback."""
    names = {1: "Like", -1: "Dislike"}
    values = [turn.get("feedback") for turn in turns]
    return [names.get(v) if isinstance(v, int) else None for v in values]


def feedback_score(liked: bool | str) -> int:
    """gr.LikeData.liked -> the stored value: +1, -1, or 0 when the user took the vote back."""
    if liked is True or liked == "Like":
        return 1
    if liked is False or liked == "Dislike":
        return -1
    return 0
