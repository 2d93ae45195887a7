"""Request bodies of the OpenAI-compatible routes. Unknown fields are accepted and ignored, as the
OpenAI SDKs and LangChain send many optional ones."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """Flattens content parts: only text parts are supported."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") not in ("text", "input_text"):
                raise ValueError(f"unsupported content part type: {part.get('type')!r} (only text is supported)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage]
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    session_id: str | None = Field(default=None, max_length=128)
    stream_options: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v


class CheckRequest(BaseModel):
    """`/v1/checks`: either `input` (one user message) or OpenAI-style `messages`."""

    model_config = ConfigDict(extra="forbid")

    input: str | None = None
    messages: list[ChatMessage] | None = None
