"""A real guardchat server (app/main.py adds observability: the middleware, /metrics, the instrumented state)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.settings import Settings
from tests.fixtures.server import LiveServer


def observed(settings: Settings) -> LiveServer:
    return LiveServer(settings)


@pytest.fixture(scope="module")
def observed_server(base_settings: Settings) -> Iterator[LiveServer]:
    with observed(base_settings) as server:
        yield server
