"""Admin REST API for the live rails config: read, validate, try, publish, list/diff versions, roll back.

Every route needs `Authorization: Bearer <GUARDCHAT_ADMIN_TOKEN>`. Publishing goes through the
`RailsPublisher` in `state.rails_publisher` (built by `build_rails_publisher` in the lifespan):
a 409 (stale base version) or 422 (invalid config) leaves the live config untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from app.admin.publisher import RailsInvalid, RailsPublisher
from app.admin.versions import StoreEmpty, VersionConflict, VersionInfo, VersionNotFound
from app.api.deps import StateDep
from app.api.errors import APIError, error_body
from app.api.security import admin_token, is_admin_token

__all__ = ["router"]

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="GUARDCHAT_ADMIN_TOKEN")


async def require_admin(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    challenge = {"WWW-Authenticate": "Bearer"}
    if admin_token(state.settings) is None:  # fail closed: no token configured means nobody is an admin
        raise APIError(401, "The admin API is disabled: no admin token is configured.", "admin_disabled", challenge)
    given = credentials.credentials if credentials else ""
    if not is_admin_token(state.settings, given):
        raise APIError(
            401, "A valid admin token is required (Authorization: Bearer <token>).", "invalid_admin_token", challenge
        )


async def get_publisher(state: StateDep) -> RailsPublisher:
    if state.rails_publisher is None:
        raise APIError(503, "The rails store is not available.", "rails_store_unavailable")
    return state.rails_publisher


PublisherDep = Annotated[RailsPublisher, Depends(get_publisher)]
router = APIRouter(prefix="/admin/api", tags=["admin"], dependencies=[Depends(require_admin)])


class FilesBody(BaseModel):
    files: dict[str, str] = Field(description="{relative path: content} of the whole rails config")


class PublishBody(FilesBody):
    base_version: int = Field(description="The live version the edit started from (409 when it is no longer live)")
    message: str = Field(default="", max_length=2000)
    author: str | None = Field(default=None, max_length=200)


class TryBody(FilesBody):
    message: str = Field(description="The user message to run the input rails on")
    answer: str | None = Field(default=None, description="An assistant answer to run the output rails on")
    history: list[dict[str, str]] | None = None
    context: list[str] | None = Field(default=None, description="Retrieved text for the groundedness rail")


class RollbackBody(BaseModel):
    version: int
    message: str | None = Field(default=None, max_length=2000)
    author: str | None = Field(default=None, max_length=200)


def _author(body_author: str | None, header_author: str | None) -> str:
    return (body_author or header_author or "admin").strip()[:200] or "admin"


def _version_json(info: VersionInfo) -> dict[str, Any]:
    data = info.to_dict()
    data["version"] = data.pop("number")
    return data


def _invalid_response(exc: RailsInvalid) -> JSONResponse:
    body = error_body(422, str(exc), "invalid_rails")
    body["errors"] = exc.outcome.errors
    body["tests"] = exc.outcome.tests
    return JSONResponse(body, status_code=422)


@contextmanager
def _store_errors() -> Iterator[None]:
    """Store exceptions -> clean API errors."""
    try:
        yield
    except VersionConflict as exc:
        raise APIError(
            409,
            f"Version {exc.base_version} is no longer live (version {exc.live_version} is); reload and re-apply.",
            "rails_version_conflict",
        ) from exc
    except VersionNotFound as exc:
        raise APIError(404, f"Rails version {exc.number} does not exist.", "rails_version_not_found") from exc
    except StoreEmpty as exc:
        raise APIError(503, "No rails version has been published yet.", "rails_store_empty") from exc
    except (RedisError, OSError) as exc:
        log.warning("rails store error: %s", exc)
        raise APIError(503, "The rails store is unavailable; try again shortly.", "rails_store_unavailable") from exc


AuthorHeader = Annotated[str | None, Header(alias="X-Admin-User")]


@router.get("/rails")
async def get_rails(publisher: PublisherDep) -> dict[str, Any]:
    with _store_errors():
        live = await publisher.store.live()
    return {**_version_json(live.info()), "files": live.files}


@router.put("/rails", response_model=None)
async def put_rails(body: PublishBody, publisher: PublisherDep, x_admin_user: AuthorHeader = None) -> Any:
    try:
        with _store_errors():
            version = await publisher.publish(
                body.base_version, body.files, body.message, _author(body.author, x_admin_user)
            )
    except RailsInvalid as exc:
        return _invalid_response(exc)
    return _version_json(version.info())


@router.post("/rails/validate")
async def validate_rails(body: FilesBody, publisher: PublisherDep) -> dict[str, Any]:
    outcome = await publisher.validate(body.files, run_tests=True)
    return outcome.to_dict()


@router.post("/rails/try", response_model=None)
async def try_rails(body: TryBody, publisher: PublisherDep) -> Any:
    try:
        return await publisher.try_draft(
            body.files, body.message, answer=body.answer, history=body.history, context=body.context
        )
    except RailsInvalid as exc:
        return _invalid_response(exc)


@router.get("/rails/status")
async def rails_status(publisher: PublisherDep) -> dict[str, Any]:
    """What this replica serves vs what is live in the store (they differ for up to ~1 s after a publish)."""
    with _store_errors():
        live = await publisher.store.live_number()
    guard = publisher.live.current.guard
    return {
        "live_version": live,
        "serving_version": publisher.live.current.version,
        "last_sync_error": publisher.last_sync_error,
        # Which engine runs the served config, and why (iorails | compiled | nemo: docs/rails.md).
        "engine": guard.engine_name,
        "engine_reason": guard.engine_reason,
    }


@router.get("/rails/versions")
async def list_versions(publisher: PublisherDep) -> dict[str, Any]:
    with _store_errors():
        live = await publisher.store.live_number()
        versions = await publisher.store.list()
    return {"live_version": live, "versions": [_version_json(v) for v in versions]}


@router.get("/rails/versions/{version}")
async def get_version(version: int, publisher: PublisherDep) -> dict[str, Any]:
    with _store_errors():
        found = await publisher.store.get(version)
    return {**_version_json(found.info()), "files": found.files}


@router.get("/rails/diff")
async def diff_versions(
    publisher: PublisherDep,
    from_version: Annotated[int | None, Query(alias="from")] = None,
    to_version: Annotated[int | None, Query(alias="to")] = None,
) -> dict[str, Any]:
    """Unified diff from `from` (default: the version before `to`) to `to` (default: the live version)."""
    with _store_errors():
        to_number = to_version if to_version is not None else await publisher.store.live_number()
        from_number = from_version if from_version is not None else to_number - 1
        diff = await publisher.store.diff(from_number, to_number)
    return {"from": from_number, "to": to_number, "diff": diff}


@router.post("/rails/rollback", response_model=None)
async def rollback_rails(body: RollbackBody, publisher: PublisherDep, x_admin_user: AuthorHeader = None) -> Any:
    try:
        with _store_errors():
            version = await publisher.rollback(body.version, _author(body.author, x_admin_user), body.message)
    except RailsInvalid as exc:
        return _invalid_response(exc)
    return _version_json(version.info())
