"""There is no Docker engine here: the compose file and the Dockerfile are checked as data."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from app.settings import PROJECT_ROOT, Settings

COMPOSE = PROJECT_ROOT / "docker-compose.yml"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _profile(compose: dict[str, Any], name: str) -> set[str]:
    return {svc for svc, spec in compose["services"].items() if name in spec.get("profiles", [])}


def test_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"app", "redis", "llm", "guard"} <= set(services)
    assert _profile(compose, "cpu") == {"app", "redis"}
    assert _profile(compose, "gpu") >= {"redis", "llm", "guard"}
    gpu_apps = _profile(compose, "gpu") - {"redis", "llm", "guard"}
    assert len(gpu_apps) == 1, "exactly one app service in the gpu profile"
    for app_name in ("app", *gpu_apps):
        build = services[app_name]["build"]
        context = build if isinstance(build, str) else build["context"]
        assert (COMPOSE.parent / context / "Dockerfile").is_file()
        for dependency in services[app_name].get("depends_on", {}):
            assert dependency in services
            assert set(services[dependency]["profiles"]) >= set(services[app_name]["profiles"])


def test_every_guardchat_variable_is_a_setting(compose: dict[str, Any]) -> None:
    known = {f"GUARDCHAT_{name.upper()}" for name in Settings.model_fields}
    seen = set()
    for name, service in compose["services"].items():
        for var in _env(service):
            if var.startswith("GUARDCHAT_"):
                assert var in known, f"{name}: {var} is not a Settings field"
                seen.add(var)
    dockerfile_vars = set(re.findall(r"\b(GUARDCHAT_[A-Z_]+)=", DOCKERFILE.read_text()))
    assert dockerfile_vars <= known, dockerfile_vars - known
    assert {"GUARDCHAT_REDIS_URL", "GUARDCHAT_API_KEYS", "GUARDCHAT_ADMIN_TOKEN", "GUARDCHAT_LLM_URL"} <= seen


def test_cpu_app_uses_the_embedded_defaults(compose: dict[str, Any]) -> None:
    env = _env(compose["services"]["app"])
    assert env["GUARDCHAT_LLM_BACKEND"] == "embedded" and "GUARDCHAT_LLM_URL" not in env
    assert env["GUARDCHAT_REDIS_URL"].startswith("redis://redis:")
    Settings(**{k.removeprefix("GUARDCHAT_").lower(): v for k, v in env.items() if "${" not in v})  # valid values


def test_gpu_app_points_at_the_trtllm_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    (gpu_app,) = _profile(compose, "gpu") - {"redis", "llm", "guard"}
    env = _env(services[gpu_app])
    assert env["GUARDCHAT_LLM_URL"] == "http://llm:8000/v1"
    assert env["GUARDCHAT_GUARD_URL"] == "http://guard:8000/v1"
    assert env["GUARDCHAT_GUARD_BACKEND"] == "openai"
    for name, model_var in (("llm", "GUARDCHAT_LLM_MODEL"), ("guard", "GUARDCHAT_GUARD_MODEL")):
        spec = services[name]
        assert "tensorrt-llm" in spec["image"]
        command = spec["command"]
        assert command[0] == "trtllm-serve"
        served = PurePosixPath(command[1]).name  # trtllm-serve serves a model under its directory's name
        assert served == env[model_var], "the app must ask for the name the server serves"
        assert command[command.index("--port") + 1] == "8000"
        devices = spec["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
        assert any(v.startswith("model-cache:") for v in spec["volumes"])
    assert "Llama-3.1-8B" in " ".join(services["llm"]["command"])
    assert "Llama-Guard-3-8B" in " ".join(services["guard"]["command"])


def test_healthchecks_volumes_and_persistence(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, spec in services.items():
        test = spec["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    assert "/health" in " ".join(services["llm"]["healthcheck"]["test"])
    assert "--appendonly" in services["redis"]["command"]
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    app_env = _env(services["app"])
    assert any(v.split(":")[1] == app_env["GUARDCHAT_DATA_DIR"] for v in services["app"]["volumes"])
    assert {"app-data", "redis-data", "model-cache"} <= set(compose["volumes"])
    grace = float(app_env["GUARDCHAT_SHUTDOWN_GRACE_S"])
    assert float(services["app"]["stop_grace_period"].rstrip("s")) > grace


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    # The CPU image (GPU=0, the default) takes torch from the CPU wheel index; tests/hardening/test_gpu_install.py
    # checks the GPU=1 branch.
    cpu_torch = "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0"
    torch = next(i for i, line in enumerate(lines) if cpu_torch in line)
    package = next(i for i, line in enumerate(lines) if re.fullmatch(r"RUN pip install \.", line))
    assert torch < package, "the CPU torch wheel must be installed before the package pulls in a CUDA one"
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("USER root", "USER 0")
    assert lines.index(users[-1]) > package
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert "exec guardchat serve" in text


def test_dockerignore_keeps_secrets_and_bulk_out() -> None:
    ignored = {
        line.strip() for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"
    }
    assert {".git", ".venv", "data/", ".env", "tests/"} <= ignored
    for needed in ("app", "rails", "knowledge", "pyproject.toml"):
        assert needed not in ignored and f"{needed}/" not in ignored
    assert Path(PROJECT_ROOT / "app").is_dir()


def _installed_closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions these requirements pull in (with their extras), by normalised name."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # its marker left it out on this platform
        found[key[0]] = dist
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append(sub)
    return found


def test_python_cap_is_only_where_a_dependency_needs_it() -> None:
    """requires-python admits every minor version all our (installed) dependencies declare support for, and
    stops at the first one some dependency excludes (nemoguardrails 0.24.1: <3.14). Wheel availability per
    Python was checked by hand; pyproject.toml's comment says how."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    claimed = SpecifierSet(project["requires-python"])
    declared = {
        name: SpecifierSet(dist.metadata["Requires-Python"])
        for name, dist in _installed_closure(project["dependencies"] + project["optional-dependencies"]["dev"]).items()
        if dist.metadata.get("Requires-Python")
    }
    assert "nemoguardrails" in declared and "torch" in declared
    minors = [f"3.{m}.99" for m in range(11, 20)]  # a late patch release: some ask for >=3.11.5 (soupsieve)
    claimed_minors = [v for v in minors if v in claimed]
    assert claimed_minors[0] == "3.11.99"
    for version in claimed_minors:
        excluding = sorted(name for name, spec in declared.items() if version not in spec)
        assert not excluding, f"requires-python claims {version}, which {excluding} exclude"
    first_unclaimed = next(v for v in minors if v not in claimed)
    needing = sorted(name for name, spec in declared.items() if first_unclaimed not in spec)
    assert needing, f"requires-python stops before {first_unclaimed}, but no dependency excludes it"
