"""llama.cpp's server (the embedded one app/llm/embedded.py starts, or a llama-server you run:
GUARDCHAT_LLM_BACKEND=llamacpp): the OpenAI wire plus GBNF `grammar` in the body; it continues a final assistant
message instead of answering after it; it has no LoRA adapters."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from app.llm.client import OpenAICompatClient

log = logging.getLogger(__name__)


class LlamaCppClient(OpenAICompatClient):
    continues_assistant: ClassVar[bool] = True
    accepts_grammar: ClassVar[bool] = True

    def _select_adapter(self, body: dict[str, Any], name: str) -> None:
        log.warning("the llama.cpp backend has no LoRA adapters; ignoring adapter %r", name)

    def _stream_headers(self) -> dict[str, str]:
        # llama.cpp closes the connection after every streamed answer, without saying so. Pooled, such a connection
        # was handed to the next request before its close was seen, which then failed ("Can not write request
        # body"; an error with max_retries=0, else a retry after 0.1 s). Asked to close, llama.cpp says
        # `Connection: close` and aiohttp does not pool the connection.
        return {"Connection": "close"}
