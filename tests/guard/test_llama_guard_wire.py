"""Llama Guard 3 over trtllm-serve's /v1/completions: the prompt the model reads begins with exactly one BOS.

The stand-in below handles a completions request the way trtllm-serve does (TensorRT-LLM's
tensorrt_llm/serve/openai_protocol.py and openai_server.py, read in the NVIDIA/TensorRT-LLM repository):
- the body is a CompletionRequest, a pydantic model with extra="forbid": an unknown field is a 400;
- the prompt is tokenized with `add_special_tokens` from the request, default true, and Llama Guard 3's
  tokenizer (Llama 3.1's: tokenizer.json's post-processor) then prepends <|begin_of_text|> (id 128000);
- special-token text in the prompt (`<|begin_of_text|>`, `<|eot_id|>`, ...) becomes those special tokens.
It records the token ids the model would read; only the ids of the special tokens are exact (plain text is
one placeholder id per run), which is all the BOS question needs.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from app.guard.llama_guard import LlamaGuardClient, SafetyCategory
from app.guard.rails import build_guard
from app.llm.client import OpenAICompatClient
from tests.fixtures.threaded import free_port, serve_in_thread
from tests.guard.conftest import GUARD_MODEL, RAILS_DIR, _Unused, remote_settings

BOS = 128000
LLAMA3_SPECIAL = {"<|begin_of_text|>": BOS, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                  "<|eot_id|>": 128009}
TEXT = -1  # a run of ordinary text
CATEGORIES = [SafetyCategory("S1", "Violent Crimes"), SafetyCategory("S2", "Non-Violent Crimes")]


class TrtllmCompletionRequest(BaseModel):
    """trtllm-serve's CompletionRequest (its fields; the sampling ones accept what the server accepts)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | list[int] | list[str] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = False
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    max_tokens: int | None = None
    n: int = 1
    presence_penalty: float | None = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    suffix: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    lora_request: dict[str, Any] | None = None
    prompt_ignore_length: int | None = 0
    use_beam_search: bool = False
    top_k: int = 0
    top_p_min: float = 0.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    return_context_logits: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    response_format: dict[str, Any] | None = None
    disaggregated_params: dict[str, Any] | None = None


def llama3_token_ids(prompt: str, add_special_tokens: bool) -> list[int]:
    ids = [BOS] if add_special_tokens else []
    for piece in re.split(r"(<\|[a-z_]+\|>)", prompt):
        if piece in LLAMA3_SPECIAL:
            ids.append(LLAMA3_SPECIAL[piece])
        elif piece:
            ids.append(TEXT)
    return ids


class TrtllmStandIn:
    def __init__(self) -> None:
        self.token_ids: list[list[int]] = []
        self.app = FastAPI()

        @self.app.exception_handler(RequestValidationError)
        async def invalid(_: Any, exc: RequestValidationError) -> JSONResponse:  # trtllm-serve's own handler
            return JSONResponse(status_code=400, content={"error": str(exc)})

        @self.app.post("/v1/completions")
        async def completions(request: TrtllmCompletionRequest) -> JSONResponse:
            assert isinstance(request.prompt, str)
            self.token_ids.append(llama3_token_ids(request.prompt, request.add_special_tokens))
            return JSONResponse({
                "id": "cmpl-1", "object": "text_completion", "created": int(time.time()), "model": "Llama-Guard-3-8B",
                "choices": [{"index": 0, "text": "safe", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(self.token_ids[-1]), "completion_tokens": 1, "total_tokens": 0},
            })


@pytest.fixture(scope="module")
def trtllm() -> Iterator[tuple[TrtllmStandIn, str]]:
    stand_in, port = TrtllmStandIn(), free_port()
    with serve_in_thread(stand_in.app, port):
        yield stand_in, f"http://127.0.0.1:{port}/v1"


async def _judge(url: str, **options: Any) -> None:
    backend = OpenAICompatClient(url, GUARD_MODEL, timeout_s=5.0, max_retries=0)
    try:
        verdict = await LlamaGuardClient(backend, CATEGORIES, **options).check([("User", "How do I freeze my card?")])
    finally:
        await backend.aclose()
    assert verdict.safe


async def test_remote_llama_guard_reads_exactly_one_bos(trtllm) -> None:
    stand_in, url = trtllm
    stand_in.token_ids.clear()
    await _judge(url)  # as app/guard/rails.py builds the remote judge: use_grammar False
    (ids,) = stand_in.token_ids
    assert ids[0] == BOS and ids.count(BOS) == 1, ids[:4]
    assert ids[1:4] == [128006, TEXT, 128007]  # <|start_header_id|>user<|end_header_id|>


async def test_without_the_flag_the_server_would_prepend_a_second_bos(trtllm) -> None:
    """What the judge sent before: the stand-in really does tell the two apart."""
    stand_in, url = trtllm
    stand_in.token_ids.clear()
    await _judge(url, verbatim_prompt=False)
    assert stand_in.token_ids[0][:2] == [BOS, BOS]


async def test_the_stand_in_rejects_fields_trtllm_serve_does_not_know(trtllm) -> None:
    _, url = trtllm
    backend = OpenAICompatClient(url, GUARD_MODEL, timeout_s=5.0, max_retries=0)
    from app.llm.base import GenerationOptions, LLMBadResponse

    try:
        with pytest.raises(LLMBadResponse, match="HTTP 400"):
            await backend.complete_prompt("hi", GenerationOptions(extra={"grammar": "root ::= x"}))
    finally:
        await backend.aclose()


async def test_the_shipped_rails_in_remote_mode_send_one_bos(trtllm, embedder, detector) -> None:
    stand_in, url = trtllm
    guard = await asyncio.to_thread(
        build_guard, RAILS_DIR, remote_settings(url), llm=_Unused(), embedder=embedder, detector=detector
    )
    stand_in.token_ids.clear()
    try:
        decision = await guard.check_output(
            [{"role": "user", "content": "How do I freeze my card?"}], "Open Cards, pick the card and tap Freeze."
        )
    finally:
        await guard.aclose()
    assert decision.allowed and stand_in.token_ids, decision
    for ids in stand_in.token_ids:
        assert ids[0] == BOS and ids.count(BOS) == 1, ids[:4]
