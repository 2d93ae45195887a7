"""guardchat: a guardrailed RAG chat server."""

__version__ = "0.1.0"
