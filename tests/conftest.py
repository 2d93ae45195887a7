"""Shared fixtures live in tests/fixtures/*.py, one file per owner; they are registered here."""

import os

# NeMo Guardrails phones home by default; tests never do.
os.environ.setdefault("NEMO_GUARDRAILS_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = [
    "tests.fixtures.redis",
    "tests.fixtures.llm",
    "tests.fixtures.embedder",
    "tests.fixtures.server",
]
