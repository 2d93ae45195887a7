"""Registers the browser fixtures and the screenshot-on-failure hook for tests/browser only."""

from tests.fixtures.browser import (  # noqa: F401
    browser,
    chromium_executable,
    llama_guard_standin,
    page,
    pytest_runtest_makereport,
    ui_server,
    ui_settings,
)
