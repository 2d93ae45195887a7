"""trtllm-serve: the OpenAI wire, with a LoRA adapter in the body as `lora_request` {lora_name, lora_int_id,
lora_path} (it loads the adapter per request, so each needs a path) and readiness at GET <root>/health."""

from __future__ import annotations

from typing import Any

from app.llm.client import OpenAICompatClient


class TrtLLMClient(OpenAICompatClient):
    def _check_adapters(self) -> None:
        pathless = [a.name for a in self._adapters.values() if not a.path]
        if pathless:
            raise ValueError(f"trtllm-serve needs a path for each LoRA adapter (name=path): {', '.join(pathless)}")

    def _select_adapter(self, body: dict[str, Any], name: str) -> None:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise ValueError(f"LoRA adapter {name!r} has no path configured for trtllm-serve")
        body["lora_request"] = {"lora_name": adapter.name, "lora_int_id": adapter.int_id, "lora_path": adapter.path}

    def _health_url(self) -> str:
        return self.root_url + "/health"

    def _check_health(self, raw: bytes) -> None:
        return  # trtllm-serve's /health answers 200 with an empty body
