"""A real guardchat server with observability installed (a no-op when app/main.py already installs it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.observability import install_observability
from app.settings import Settings
from tests.fixtures.server import LiveServer


def observed(settings: Settings) -> LiveServer:
    server = LiveServer(settings)
    install_observability(server.app, server.settings)
    return server


@pytest.fixture(scope="module")
def observed_server(base_settings: Settings) -> Iterator[LiveServer]:
    with observed(base_settings) as server:
        yield server
