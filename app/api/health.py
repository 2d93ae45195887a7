"""Liveness, readiness and the model list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import StateDep
from app.llm.base import LLMError
from app.sessions.base import StoreUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(state: StateDep) -> dict[str, Any] | JSONResponse:
    checks: dict[str, str] = {}
    try:
        await state.llm.health()
        checks["llm"] = "ok"
    except LLMError as exc:
        checks["llm"] = f"unavailable: {exc}"
    try:
        await state.store.ping()
        checks["store"] = "ok"
    except StoreUnavailable as exc:
        checks["store"] = f"unavailable: {exc}"
    checks["rails"] = f"ok (version {state.rails.current.version})"
    ready = all(v.startswith("ok") for v in checks.values())
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "checks": checks}
    if state.page_warmer is not None:  # informational: answers never wait for it (app/llm/page_warmer.py)
        body["answer_pages"] = state.page_warmer.progress()
    if not ready:
        reasons = "; ".join(f"{k}: {v}" for k, v in checks.items() if not v.startswith("ok"))
        body["error"] = {"message": f"Not ready: {reasons}", "type": "service_unavailable", "code": "not_ready"}
        return JSONResponse(body, status_code=503)
    return body


@router.get("/v1/models")
async def models(state: StateDep) -> dict[str, Any]:
    name = state.llm.model_name or state.settings.llm_model or "guardchat"
    ids = [name, *state.settings.lora_adapter_names]
    return {
        "object": "list",
        "data": [{"id": i, "object": "model", "created": 0, "owned_by": "guardchat"} for i in ids],
    }
