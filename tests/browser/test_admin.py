"""The admin console at `/admin` in real Chromium: log in, add a topical rule to the rails, validate, try it
on the draft, publish, see the chat obey it without a restart, roll back, see the old rules again."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.browser.chat_page import bot_messages, open_chat, send
from tests.fixtures.browser import ADMIN_TOKEN
from tests.fixtures.server import LiveServer

pytestmark = [pytest.mark.browser, pytest.mark.slow]

QUESTION = "Can I buy bitcoin with my Larkspur debit card?"
INTENT = "ask cryptocurrency"
CRYPTO_RULE = f"""# Larkspur Bank offers no cryptocurrency services.
define user {INTENT}
  "Can I buy bitcoin with my debit card?"
  "How do I buy cryptocurrency through Larkspur Bank?"
  "Does Larkspur Bank support crypto trading?"
  "Can I send money from my account to a crypto exchange?"
  "Should I invest in Ethereum or Bitcoin?"
"""
BLOCK_BADGE = f"Blocked by topic ({INTENT})"


def _login(page: Any, base_url: str) -> None:
    page.goto(base_url + "/admin")
    page.fill("#gc-admin-token input", "not-the-token")
    page.click("#gc-login-btn")
    page.wait_for_selector("#gc-login-msg :text('Login failed')")
    assert not page.locator("#gc-console").is_visible()
    page.fill("#gc-admin-token input", ADMIN_TOKEN)
    page.click("#gc-login-btn")
    page.wait_for_selector("#gc-editor .cm-content")
    page.wait_for_selector("#gc-rails-status :text('live version')")


def _set_editor(page: Any, text: str) -> None:
    editor = page.locator("#gc-editor .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    editor.fill(text)


def _pick_file(page: Any, name: str) -> None:
    page.locator("#gc-file input").click()
    page.get_by_role("option", name=name, exact=True).click()
    page.wait_for_selector(f"#gc-rails-status :text('Editing `{name}`'), #gc-rails-status :text('Editing {name}')")


def _wait_text(page: Any, selector: str, pattern: str, timeout: float = 180_000) -> str:
    page.wait_for_function(
        "([sel, pat]) => new RegExp(pat).test(document.querySelector(sel)?.innerText || '')",
        arg=[selector, pattern],
        timeout=timeout,
    )
    return str(page.inner_text(selector))


def _chat_badge(page: Any, base_url: str) -> str:
    open_chat(page, base_url)
    page.click("#gc-new-chat")
    page.wait_for_function("() => document.querySelectorAll('#gc-chat .gc-why').length === 0")
    send(page, QUESTION)
    return str(bot_messages(page).last.inner_text())


def test_publish_a_topical_rule_then_roll_back(page: Any, ui_server: LiveServer) -> None:
    chat = page.context.new_page()
    assert BLOCK_BADGE not in _chat_badge(chat, ui_server.url)  # the shipped rules allow it

    _login(page, ui_server.url)
    config = (ui_server.settings.rails_dir / "config.yml").read_text()
    new_config, count = re.subn(r"(blocked_intents: \[)", rf"\1{INTENT}, ", config, count=1)
    assert count == 1

    page.fill("#gc-new-file input, #gc-new-file textarea", "crypto.co")
    page.click("#gc-add-file")
    _wait_text(page, "#gc-rails-status", "Added `?crypto.co")
    _set_editor(page, CRYPTO_RULE)
    _pick_file(page, "config.yml")
    _set_editor(page, new_config)

    page.click("#gc-validate")
    assert "Valid" in _wait_text(page, "#gc-rails-result", "Valid|Invalid")
    assert "Invalid" not in page.inner_text("#gc-rails-result")

    page.fill("#gc-try-message textarea", QUESTION)
    page.click("#gc-try")
    tried = _wait_text(page, "#gc-try-result", "Input rails")
    assert "blocked by topic" in tried.lower()
    assert BLOCK_BADGE not in _chat_badge(chat, ui_server.url)  # trying a draft publishes nothing

    page.fill("#gc-publish-message textarea", "Refuse cryptocurrency questions")
    page.click("#gc-publish")
    assert "Published version 2" in _wait_text(page, "#gc-rails-result", "Published|Not published")
    assert BLOCK_BADGE in _chat_badge(chat, ui_server.url)  # no restart

    page.get_by_role("tab", name="Versions").click()
    page.fill("#gc-version-number input", "2")
    page.click("#gc-diff")
    diff = _wait_text(page, "#gc-versions-status", "Changes in version 2") and page.inner_text("#gc-diff-view")
    assert "crypto.co" in diff and INTENT in diff
    page.fill("#gc-version-number input", "1")
    page.click("#gc-rollback")
    assert "Rolled back" in _wait_text(page, "#gc-versions-status", "Rolled back|refused|❌")
    assert "Refuse cryptocurrency questions" in page.inner_text("#gc-versions")
    assert BLOCK_BADGE not in _chat_badge(chat, ui_server.url)  # the old rules again
