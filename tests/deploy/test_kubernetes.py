"""The Kustomize overlays in deploy/kubernetes, rendered with real kustomize and checked against the Kubernetes
schemas and against the app (routes, settings, drain, secrets). No cluster here: nothing is applied."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.settings import PROJECT_ROOT
from tests.deploy import checks
from tests.deploy.manifests import (
    KUSTOMIZE_ROOT,
    OVERLAYS,
    Obj,
    app_container,
    app_deployment,
    container_env,
    documented_secrets,
    find,
    of_kind,
    render,
    render_overlay,
)

# The oldest release the manifests claim (kubectl's kustomize with components and `labels`; all APIs GA) and
# the newest the schema package bundles.
KUBERNETES_VERSIONS = ("1.30", "1.37")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_kubernetes_schemas(overlay: str, version: str) -> None:
    objs = render_overlay(overlay)
    assert len(objs) >= 5
    assert checks.schema_problems(objs, version) == []
    assert {obj["metadata"].get("namespace") for obj in objs} == {"guardchat"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_app_matches_the_manifests(overlay: str) -> None:
    objs = render_overlay(overlay)
    assert checks.app_probe_problems(objs) == []
    assert checks.settings_problems(objs) == []
    assert checks.grace_problems(objs) == []
    assert checks.embedded_threads_problems(objs) == []
    assert checks.reference_problems(objs) == []
    assert checks.redis_problems(objs) == []
    assert checks.autoscaling_problems(objs) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_a_pod_reads_is_created_in_the_docs(overlay: str) -> None:
    documented = documented_secrets()
    assert ("guardchat-secrets", "admin-token") in documented, "the docs must show creating the secrets"
    assert checks.secret_problems(render_overlay(overlay), documented) == []


def test_gpu_profile_runs_the_models_on_trtllm_serve_with_a_gpu_each() -> None:
    objs = render_overlay("gpu")
    assert checks.gpu_problems(objs) == []
    servers = {w["metadata"]["name"] for w in of_kind(objs, "Deployment")} - {"guardchat"}
    assert servers == {"guardchat-llm", "guardchat-guard"}
    assert sorted(checks.gpu_requested(objs)) == sorted(servers)
    assert app_container(objs)["image"].endswith(":gpu"), "the image without embedded weights"
    for name in servers:
        deployment = find(objs, "Deployment", name)
        assert deployment is not None and deployment["spec"]["strategy"]["type"] == "Recreate"
        (server,) = deployment["spec"]["template"]["spec"]["containers"]
        assert "tensorrt-llm" in server["image"] and server["startupProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("overlay", ["cpu", "external-redis"])
def test_cpu_profiles_ask_for_no_gpu_and_run_the_embedded_model(overlay: str) -> None:
    objs = render_overlay(overlay)
    assert checks.gpu_requested(objs) == []
    env = container_env(objs, app_container(objs))
    assert env["GUARDCHAT_LLM_BACKEND"].value == "embedded"
    assert "GUARDCHAT_LLM_URL" not in env


def test_redis_is_in_the_cluster_or_an_external_url_from_a_secret() -> None:
    in_cluster = render_overlay("cpu")
    assert find(in_cluster, "StatefulSet", "guardchat-redis") is not None
    assert container_env(in_cluster, app_container(in_cluster))["GUARDCHAT_REDIS_URL"].value == (
        "redis://guardchat-redis:6379/0"
    )
    external = render_overlay("external-redis")
    assert of_kind(external, "StatefulSet") == []
    assert container_env(external, app_container(external))["GUARDCHAT_REDIS_URL"].secret == ("guardchat-redis", "url")


def test_components_compose_in_your_own_overlay(tmp_path: Path) -> None:
    """The docs' example: GPU model servers with an external Redis."""
    root = os.path.relpath(KUSTOMIZE_ROOT, tmp_path)  # kustomize takes relative paths only
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: guardchat\n"
        f"resources:\n  - {root}/base\n"
        f"components:\n  - {root}/components/external-redis\n  - {root}/components/gpu\n"
    )
    objs = render(tmp_path)
    assert of_kind(objs, "StatefulSet") == []
    assert checks.gpu_problems(objs) == checks.redis_problems(objs) == checks.reference_problems(objs) == []
    assert checks.schema_problems(objs, KUBERNETES_VERSIONS[-1]) == []


def test_docs_walk_through_the_overlays_and_a_served_chat() -> None:
    doc = (PROJECT_ROOT / "docs" / "deployment.md").read_text()
    for overlay in OVERLAYS:
        assert f"deploy/kubernetes/overlays/{overlay}" in doc
    assert "/v1/chat/completions" in doc and "/v1/chat/completions" in checks.app_routes()
    assert re.search(r"kubectl -n guardchat port-forward service/guardchat (\d+):\1", doc)
    assert re.search(r"kubectl -n guardchat scale deployment/guardchat", doc)


# --- the checks catch what they are for: each mutation breaks one thing in a fresh render -----------------------


def _set_probe_path(probe: str, path: str) -> Callable[[list[Obj]], None]:
    def mutate(objs: list[Obj]) -> None:
        app_container(objs)[probe]["httpGet"]["path"] = path

    return mutate


def _set_config(name: str, value: str) -> Callable[[list[Obj]], None]:
    def mutate(objs: list[Obj]) -> None:
        (config_map,) = of_kind(objs, "ConfigMap")
        config_map["data"][name] = value

    return mutate


def _drop_config(name: str) -> Callable[[list[Obj]], None]:
    def mutate(objs: list[Obj]) -> None:
        (config_map,) = of_kind(objs, "ConfigMap")
        del config_map["data"][name]

    return mutate


def _short_grace(objs: list[Obj]) -> None:
    app_deployment(objs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30


def _rename_secret_key(objs: list[Obj]) -> None:
    app_container(objs)["env"][0]["valueFrom"]["secretKeyRef"]["key"] = "api-key"


def _optional_admin_token(objs: list[Obj]) -> None:
    for entry in app_container(objs)["env"]:
        if entry["name"] == "GUARDCHAT_ADMIN_TOKEN":
            entry["valueFrom"]["secretKeyRef"]["optional"] = True


def _typo_field(objs: list[Obj]) -> None:
    app_deployment(objs)["spec"]["replica"] = 3


def _no_gpu_for_guard(objs: list[Obj]) -> None:
    deployment = find(objs, "Deployment", "guardchat-guard")
    assert deployment is not None
    for section in ("requests", "limits"):
        del deployment["spec"]["template"]["spec"]["containers"][0]["resources"][section]["nvidia.com/gpu"]


def _service_port_renamed(objs: list[Obj]) -> None:
    service = find(objs, "Service", "guardchat")
    assert service is not None
    service["spec"]["ports"][0]["targetPort"] = "web"


Check = Callable[[list[Obj]], list[str]]


@dataclass(frozen=True)
class Mutation:
    overlay: str
    mutate: Callable[[list[Obj]], None]
    check: Check
    says: str  # a fragment of the problem it must report: the right check fired for the right reason


def _secrets(objs: list[Obj]) -> list[str]:
    return checks.secret_problems(objs, documented_secrets())


MUTATIONS = {
    "readiness on a missing route": Mutation(
        "cpu", _set_probe_path("readinessProbe", "/ready"), checks.app_probe_problems, "not a route of the app"
    ),
    "liveness on /readyz": Mutation(
        "cpu", _set_probe_path("livenessProbe", "/readyz"), checks.app_probe_problems, "draining pod would be killed"
    ),
    "readiness behind the API key": Mutation(
        "cpu", _set_probe_path("readinessProbe", "/v1/models"), checks.app_probe_problems, "needs an API key"
    ),
    "unknown setting": Mutation(
        "cpu", _set_config("GUARDCHAT_LLM_BACKENDS", "embedded"), checks.settings_problems, "not a settings field"
    ),
    "invalid setting value": Mutation(
        "cpu", _set_config("GUARDCHAT_LLM_BACKEND", "trt-llm"), checks.settings_problems, "llm_backend"
    ),
    "drain longer than the grace": Mutation(
        "cpu", _set_config("GUARDCHAT_SHUTDOWN_GRACE_S", "60"), checks.grace_problems, "drain 60.0"
    ),
    "grace shorter than the drain": Mutation(
        "cpu", _short_grace, checks.grace_problems, "terminationGracePeriodSeconds 30"
    ),
    "threads of the whole node": Mutation(
        "cpu", _set_config("GUARDCHAT_EMBEDDED_THREADS", "0"), checks.embedded_threads_problems, "THREADS=0"
    ),
    "no Redis": Mutation("cpu", _drop_config("GUARDCHAT_REDIS_URL"), checks.redis_problems, "is not set"),
    "Redis host that is no Service": Mutation(
        "cpu", _set_config("GUARDCHAT_REDIS_URL", "redis://redis:6379/0"), checks.redis_problems, "not a Service"
    ),
    "Service port that is no container port": Mutation(
        "cpu", _service_port_renamed, checks.reference_problems, "target port web"
    ),
    "secret key nobody creates": Mutation("cpu", _rename_secret_key, _secrets, "key api-key is not created"),
    "optional admin token": Mutation("cpu", _optional_admin_token, _secrets, "GUARDCHAT_ADMIN_TOKEN must come"),
    "guard without a GPU": Mutation(
        "gpu", _no_gpu_for_guard, checks.gpu_problems, "guardchat-guard: no nvidia.com/gpu"
    ),
    "chat model name nobody serves": Mutation(
        "gpu", _set_config("GUARDCHAT_LLM_MODEL", "llama-3.1-8b"), checks.gpu_problems, "served by no trtllm-serve"
    ),
    "LLM URL at the guard": Mutation(
        "gpu", _set_config("GUARDCHAT_LLM_URL", "http://guardchat-guard:8000/v1"), checks.gpu_problems, "not the pods"
    ),
}


@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_a_broken_manifest_is_caught(mutation: Mutation) -> None:
    objs = render_overlay(mutation.overlay)
    assert mutation.check(copy.deepcopy(objs)) == []
    mutation.mutate(objs)
    problems = mutation.check(objs)
    assert any(mutation.says in problem for problem in problems), problems


def test_an_unknown_field_fails_the_schema() -> None:
    objs = render_overlay("cpu")
    _typo_field(objs)
    problems = checks.schema_problems(objs, KUBERNETES_VERSIONS[-1])
    assert len(problems) == 1 and "replica" in problems[0]
