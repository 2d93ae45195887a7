"""Build the chat backend from Settings: the embedded llama.cpp server, or a remote OpenAI-compatible one."""

from __future__ import annotations

import logging

from app.llm.client import OpenAICompatClient, parse_lora_adapters
from app.llm.embedded import EmbeddedLLMServer
from app.llm.llamacpp import LlamaCppClient
from app.llm.models import fetch_model
from app.llm.trtllm import TrtLLMClient
from app.settings import Settings

log = logging.getLogger(__name__)

# GUARDCHAT_LLM_BACKEND -> the client class that speaks to it. A new OpenAI-wire server is a subclass overriding
# where it differs (app/llm/trtllm.py, app/llm/llamacpp.py) plus its line here.
BACKENDS: dict[str, type[OpenAICompatClient]] = {
    "openai": OpenAICompatClient,  # NIM, vLLM, OpenAI
    "trtllm": TrtLLMClient,
    "llamacpp": LlamaCppClient,  # a llama-server you run: the embedded server's wire
    "embedded": LlamaCppClient,  # the llama.cpp server this process starts
}


def build_chat_backend(settings: Settings) -> tuple[OpenAICompatClient, EmbeddedLLMServer | None]:
    """Return (client, embedded server or None). The caller owns both: `await client.aclose()`, `server.close()`.

    Embedded: fetches and verifies `settings.embedded_model` into `settings.models_dir` (installing the part
    packages if needed) and starts llama.cpp on 127.0.0.1. This blocks for seconds: call it via
    `asyncio.to_thread` from async code.

    Remote (openai / trtllm): `settings.lora_adapters` entries are "name" or "name=/path/on/the/gpu/host";
    trtllm-serve needs the path (it loads the adapter per request), NIM/vLLM need only the name (sent as `model`).
    The allow-list of names is `parse_lora_adapters(settings.lora_adapters).keys()`.
    """
    if settings.llm_backend == "embedded":
        return _build_embedded(settings)
    if not settings.llm_url:
        raise ValueError(
            f"GUARDCHAT_LLM_URL is required when GUARDCHAT_LLM_BACKEND={settings.llm_backend} "
            "(e.g. http://gpu-host:8000/v1)"
        )
    if not settings.llm_model:
        raise ValueError(f"GUARDCHAT_LLM_MODEL is required when GUARDCHAT_LLM_BACKEND={settings.llm_backend}")
    api_key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
    client = BACKENDS[settings.llm_backend](
        settings.llm_url,
        settings.llm_model,
        api_key=api_key,
        timeout_s=settings.llm_timeout_s,
        connect_timeout_s=settings.llm_connect_timeout_s,
        max_retries=settings.llm_max_retries,
        lora_adapters=parse_lora_adapters(settings.lora_adapters),
    )
    return client, None


def _build_embedded(settings: Settings) -> tuple[OpenAICompatClient, EmbeddedLLMServer]:
    # `serve` never installs packages (issue 20): a model whose packages are missing fails fast with "run `guardchat
    # model fetch`" (`make run` fetches first).
    model_path = fetch_model(settings.embedded_model, settings.models_dir, install_missing=False)
    server = EmbeddedLLMServer(
        model_path,
        model_name=settings.embedded_model,
        ctx_size=settings.embedded_ctx,
        threads=settings.embedded_threads,
        parallel=settings.embedded_parallel,
        prompt_cache_ram_mib=settings.embedded_prompt_cache_mib,
    ).start()
    try:
        client = LlamaCppClient(
            server.base_url,
            settings.embedded_model,
            timeout_s=settings.llm_timeout_s,
            connect_timeout_s=settings.llm_connect_timeout_s,
            max_retries=settings.llm_max_retries,
        )
    except BaseException:
        server.close()
        raise
    if settings.lora_adapters:
        log.warning("GUARDCHAT_LORA_ADAPTERS is ignored by the embedded backend (no adapters are loaded)")
    return client, server
