"""Drives the chat page at `/` the way a person does: type, press Send, wait for the finished answer."""

from __future__ import annotations

from typing import Any

ANSWER_TIMEOUT_MS = 120_000
FINISHED = "#gc-chat .gc-why, #gc-chat .gc-error"

# Records every text the last chat bubble shows while an answer streams in.
RECORD_STREAM = """() => {
  window.__gcFrames = [];
  const chat = document.querySelector('#gc-chat');
  new MutationObserver(() => {
    const bubbles = chat.querySelectorAll('[data-testid="bot"] .message-content');
    const last = bubbles[bubbles.length - 1];
    if (last) window.__gcFrames.push(last.innerText);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def open_chat(page: Any, base_url: str) -> None:
    page.goto(base_url + "/")
    wait_until_restored(page)


def wait_until_restored(page: Any) -> None:
    """The page has run its load event (the session, if any, is back on screen)."""
    page.wait_for_selector("#gc-input textarea")
    page.wait_for_selector("#gc-session-id [data-ready]", state="attached")


def finished_answers(page: Any) -> int:
    return int(page.locator(FINISHED).count())


def send(page: Any, text: str) -> Any:
    """Sends `text` and returns the locator of the new, finished assistant message."""
    before = finished_answers(page)
    page.fill("#gc-input textarea", text)
    page.click("#gc-send")
    page.wait_for_function(
        f"() => document.querySelectorAll('{FINISHED}').length > {before}", timeout=ANSWER_TIMEOUT_MS
    )
    return page.locator(FINISHED).nth(before)


def bot_messages(page: Any) -> Any:
    return page.locator('#gc-chat [data-testid="bot"] .message-content')


def stream_frames(page: Any) -> list[str]:
    return list(page.evaluate("() => window.__gcFrames || []"))
