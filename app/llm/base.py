"""The LLM boundary: one OpenAI-compatible client serves every backend (trtllm-serve, NIM, vLLM,
and the embedded llama.cpp server on loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class LLMError(Exception):
    """Base of the typed backend errors. `status` is the HTTP status the API answers with."""

    status = 503
    code = "llm_error"


class LLMUnavailable(LLMError):
    """Connection refused / DNS / reset after retries, or the backend answered 5xx."""

    status = 503
    code = "llm_unavailable"


class LLMTimeout(LLMError):
    status = 504
    code = "llm_timeout"


class LLMBadResponse(LLMError):
    """The backend answered, but not with something we can use (4xx, invalid JSON, wrong shape)."""

    status = 503
    code = "llm_bad_response"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)


@dataclass
class GenerationOptions:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    adapter: str | None = None  # LoRA adapter name, already checked against the allow-list
    grammar: str | None = None  # GBNF (llama.cpp); ignored by backends that do not support it
    request_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ChatBackend(Protocol):
    """What the pipeline needs from an LLM."""

    model_name: str

    @property
    def continues_assistant(self) -> bool:
        """llama.cpp continues a final assistant message instead of answering after it (the second look's
        prefill); OpenAI-style servers differ (vLLM needs a flag): False there."""
        ...

    async def complete(
        self, messages: list[dict[str, str]], options: GenerationOptions | None = None
    ) -> Completion: ...

    def stream(
        self,
        messages: list[dict[str, str]],
        options: GenerationOptions | None = None,
        *,
        on_usage: Callable[[Usage], None] | None = None,
    ) -> AsyncIterator[str]:
        """Yields text deltas; `on_usage` receives the final usage when the server sends it.
        Raises LLMError subclasses."""
        ...

    async def complete_prompt(self, prompt: str, options: GenerationOptions | None = None) -> Completion:
        """Raw-prompt completion (/v1/completions), used for Llama Guard."""
        ...

    async def health(self) -> None:
        """Raises LLMError when the backend is not reachable/ready."""
        ...

    async def aclose(self) -> None: ...
