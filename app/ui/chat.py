"""The customer chat at `/`: a Gradio Blocks app that calls the in-process TurnRunner (never HTTP to itself).

State per browser tab:
- `stored` (gr.BrowserState, i.e. localStorage): `{"session_id": ...}` so a reload finds the session again;
- `session` / `messages` / `turn_ids` (gr.State, server side): the live session id, the messages shown,
  and for every message the stored turn id it belongs to (thumbs up/down are sent to that turn).
The session itself (the turns) lives in the SessionStore; on load the chat is rebuilt from it.
"""

from __future__ import annotations

import html
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import gradio as gr

from app.api.errors import APIError, exception_to_error
from app.api.security import check_characters, check_text_limit
from app.pipeline.turn import Delta, Done, TurnInputError, TurnRequest, TurnRunner
from app.state import AppState
from app.ui.render import (
    ChatMessage,
    assistant_markdown,
    error_markdown,
    escape_answer,
    feedback_score,
    feedback_values,
    history_messages,
)

log = logging.getLogger(__name__)

StateGetter = Callable[[], AppState]
STORAGE_KEY = "guardchat-chat-session"
TYPING_CURSOR = " ▍"

HEADER = (
    '<div class="gc-header"><b>Larkspur Bank</b> · support assistant'
    '<div class="gc-sub">Ask about accounts, cards, fees, transfers and more. '
    "Never share your full card number, PIN or passwords.</div></div>"
)


def user_error_text(exc: BaseException) -> str:
    """A clear, non-technical message for a failed turn (the same mapping the API uses; never a traceback)."""
    if isinstance(exc, TurnInputError):
        return str(exc)
    if isinstance(exc, APIError) and exc.status < 500:  # the message itself is the problem: retrying cannot help
        return exc.message
    status, message, code = exception_to_error(exc)
    if code == "session_not_found":
        return "This conversation has expired. Press “New chat” to start a new one."
    if status >= 500 and code == "internal_error":
        message = "Something went wrong on our side."
    return f"{message} Your conversation is saved; please try again in a moment."


async def _ensure_session(state: AppState, session_id: str | None) -> str:
    if session_id and await state.store.get(session_id) is not None:
        return session_id
    return (await state.store.create()).id


def _stored(session_id: str | None) -> dict[str, Any]:
    return {"session_id": session_id}


def session_label(session_id: str | None) -> str:
    """Shown under the chat so a customer can quote it to support (it is their own conversation's id)."""
    if not session_id:
        return '<div class="gc-session" data-ready="1"></div>'  # data-ready: the page finished loading
    safe = html.escape(session_id, quote=True)
    return f'<div class="gc-session" data-ready="1">Conversation ID: <code data-session-id="{safe}">{safe}</code></div>'


class ChatActions:
    """What the chat page's events do; `get_state` returns the live AppState at request time (the lifespan builds
    it after mounting)."""

    def __init__(self, get_state: StateGetter) -> None:
        self.get_state = get_state

    async def restore(self, stored: dict[str, Any] | None) -> tuple[Any, ...]:
        session_id = (stored or {}).get("session_id")
        if not session_id:
            return [], [], None, [], _stored(None), session_label(None)
        state = self.get_state()
        try:
            if await state.store.get(session_id) is None:  # expired or deleted: start afresh
                return [], [], None, [], _stored(None), session_label(None)
            turns = [t.model_dump() for t in await state.store.history(session_id)]
        except Exception as exc:  # store down: say so, but keep the id so the next load can restore it
            log.warning("chat restore failed: %s", type(exc).__name__)
            shown: list[ChatMessage] = [{"role": "assistant", "content": error_markdown(user_error_text(exc))}]
            return shown, shown, session_id, [None], _stored(session_id), session_label(session_id)
        messages, turn_ids = history_messages(turns)
        chatbot = gr.Chatbot(value=messages, feedback_value=feedback_values(turns))  # type: ignore[arg-type]
        return chatbot, messages, session_id, turn_ids, _stored(session_id), session_label(session_id)

    async def respond(
        self, text: str, messages: list[ChatMessage], session_id: str | None, turn_ids: list[str | None]
    ) -> AsyncIterator[tuple[Any, ...]]:
        text = (text or "").strip()
        if not text:
            yield messages, "", messages, session_id, turn_ids, _stored(session_id), session_label(session_id)
            return
        messages = [*messages, {"role": "user", "content": escape_answer(text)}, {"role": "assistant", "content": ""}]
        turn_ids = [*turn_ids, None, None]
        bubble = messages[-1]
        state = self.get_state()
        try:
            # The REST API's limits on a message (413 / 400 there), checked before a session exists (issue 20).
            check_text_limit(len(text), state.settings, "Your message")
            check_characters(text, "Your message")
            session_id = await _ensure_session(state, session_id)
            label_text = session_label(session_id)
            yield messages, "", messages, session_id, turn_ids, _stored(session_id), label_text
            request = TurnRequest(messages=[{"role": "user", "content": text}], session_id=session_id)
            streamed = ""
            async for event in TurnRunner(state).events(request):
                if isinstance(event, Delta):
                    streamed += event.text
                    bubble["content"] = escape_answer(streamed) + TYPING_CURSOR
                    yield messages, "", messages, session_id, turn_ids, _stored(session_id), label_text
                elif isinstance(event, Done):
                    result = event.result
                    bubble["content"] = assistant_markdown(result.answer, result.guardchat(), result.trace)
                    turn_ids[-1] = result.turn_id
        except Exception as exc:  # the turn was not saved (TurnRunner saves only a finished turn)
            log.warning("chat turn failed: %s: %s", type(exc).__name__, exc)
            bubble["content"] = error_markdown(user_error_text(exc))
        yield messages, "", messages, session_id, turn_ids, _stored(session_id), session_label(session_id)

    async def feedback(self, session_id: str | None, turn_ids: list[str | None], data: gr.LikeData) -> None:
        index = data.index if isinstance(data.index, int) else data.index[0]
        turn_id = turn_ids[index] if 0 <= index < len(turn_ids) else None
        if not session_id or not turn_id:
            gr.Warning("Feedback can only be given on a saved answer.")
            return
        try:
            await self.get_state().store.set_feedback(session_id, turn_id, feedback_score(data.liked))
        except Exception as exc:
            log.warning("feedback failed: %s", type(exc).__name__)
            gr.Warning("Your feedback could not be saved right now.")
            return
        gr.Info("Thanks for your feedback!")

    @staticmethod
    def new_chat() -> tuple[Any, ...]:
        return [], [], None, [], _stored(None), "", session_label(None)


def build_chat(get_state: StateGetter, *, browser_secret: str | None = None) -> gr.Blocks:
    """The customer chat page; its events are ChatActions'."""
    actions = ChatActions(get_state)
    restore, respond, feedback, new_chat = actions.restore, actions.respond, actions.feedback, actions.new_chat

    with gr.Blocks(title="Larkspur Bank · Support", analytics_enabled=False) as demo:
        stored = gr.BrowserState(_stored(None), storage_key=STORAGE_KEY, secret=browser_secret)
        session = gr.State(None)
        messages = gr.State([])
        turn_ids = gr.State([])
        gr.HTML(HEADER)
        chatbot = gr.Chatbot(
            elem_id="gc-chat",
            height="62vh",
            show_label=False,
            placeholder="Hi! How can I help with your Larkspur Bank account today?",
            feedback_options=("Like", "Dislike"),
            buttons=["copy"],
            sanitize_html=True,
        )
        with gr.Row(equal_height=True, elem_id="gc-input-row"):
            textbox = gr.Textbox(
                elem_id="gc-input",
                show_label=False,
                placeholder="Type your question…",
                scale=6,
                min_width=120,
                max_lines=6,
                autofocus=True,
            )
            send = gr.Button("Send", variant="primary", elem_id="gc-send", scale=1, min_width=64)
        new = gr.Button("New chat", elem_id="gc-new-chat", size="sm", variant="secondary")
        label = gr.HTML(elem_id="gc-session-id")

        outputs = [chatbot, textbox, messages, session, turn_ids, stored, label]
        inputs = [textbox, messages, session, turn_ids]
        for trigger in (textbox.submit, send.click):
            # Many users chat at once: the per-session lock in the store, not Gradio's queue, serializes turns.
            trigger(respond, inputs, outputs, concurrency_limit=None, api_visibility="private")
        chatbot.like(feedback, [session, turn_ids], None, api_visibility="private")
        fresh = [chatbot, messages, session, turn_ids, stored, textbox, label]
        new.click(new_chat, None, fresh, api_visibility="private")
        chatbot.clear(new_chat, None, fresh, api_visibility="private")  # the Chatbot's own trash button
        restored = [chatbot, messages, session, turn_ids, stored, label]
        demo.load(restore, [stored], restored, api_visibility="private")
    return demo
