"""Checks on rendered Kubernetes objects against the app itself. Each returns a list of problems (empty = fine),
so a test can assert both that the real manifests pass and that a broken copy is caught."""

from __future__ import annotations

from functools import cache
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pydantic
from pydantic import SecretStr

from app.api.security import OPEN_PATHS
from app.lifecycle import ALWAYS_OPEN
from app.settings import Settings
from tests.deploy.manifests import (
    EnvVar,
    Obj,
    app_container,
    app_deployment,
    container_env,
    containers,
    find,
    of_kind,
    pod_labels,
    pod_spec,
    secret_refs,
    workloads,
)

GPU = "nvidia.com/gpu"
SETTINGS_FIELDS = {f"GUARDCHAT_{name.upper()}": name for name in Settings.model_fields}
DRAIN_MARGIN_S = 5  # uvicorn closes its sockets and runs the lifespan shutdown after the drain


def schema_problems(objs: list[Obj], version: str) -> list[str]:
    """Strict validation (unknown fields are errors) against the bundled OpenAPI schemas of that release."""
    problems = []
    for obj in objs:
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{where}: {exc.message}")
    return problems


@cache
def app_routes() -> frozenset[str]:
    """The HTTP paths the real app serves (its OpenAPI schema: every API router, as mounted)."""
    from app.main import create_app

    app = create_app(Settings(ui_enabled=False, redis_url=None, admin_token=SecretStr("x" * 32)))
    return frozenset(app.openapi()["paths"])


def _http_probe(container: Obj, probe: str) -> Obj | None:
    action: Obj | None = container.get(probe, {}).get("httpGet")
    return action


def _port_number(container: Obj, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def app_probe_problems(objs: list[Obj]) -> list[str]:
    container = app_container(objs)
    env = container_env(objs, container)
    listen_port = int(_value(env, "GUARDCHAT_PORT") or Settings.model_fields["port"].default)
    problems = []
    wanted = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe, path in wanted.items():
        action = _http_probe(container, probe)
        if action is None:
            problems.append(f"{probe}: missing or not an httpGet probe")
            continue
        if action["path"] not in app_routes():
            problems.append(f"{probe}: {action['path']} is not a route of the app")
        if action["path"] not in OPEN_PATHS:
            problems.append(f"{probe}: {action['path']} needs an API key, which the kubelet does not send")
        if action["path"] != path:
            problems.append(f"{probe}: asks {action['path']}, expected {path}")
        if _port_number(container, action["port"]) != listen_port:
            problems.append(f"{probe}: port {action['port']} is not GUARDCHAT_PORT {listen_port}")
    liveness = _http_probe(container, "livenessProbe")
    if liveness is not None and liveness["path"] not in ALWAYS_OPEN:
        problems.append("livenessProbe: the drain answers that path 503, so a draining pod would be killed")
    return problems


def _value(env: dict[str, EnvVar], name: str) -> str | None:
    var = env.get(name)
    return var.value if var is not None else None


def settings_problems(objs: list[Obj]) -> list[str]:
    """Every GUARDCHAT_* variable of every container is a settings field, and the literal ones validate."""
    problems = []
    for workload in workloads(objs):
        for container in containers(workload, init=True):
            env = container_env(objs, container)
            ours = {name: var for name, var in env.items() if name.startswith("GUARDCHAT_")}
            unknown = sorted(set(ours) - set(SETTINGS_FIELDS))
            problems += [f"{workload['metadata']['name']}: {name} is not a settings field" for name in unknown]
            literals: dict[str, Any] = {
                SETTINGS_FIELDS[name]: var.value
                for name, var in ours.items()
                if name in SETTINGS_FIELDS and var.value is not None
            }
            try:
                Settings(_env_file=None, **literals)  # type: ignore[call-arg]
            except pydantic.ValidationError as exc:
                problems.append(f"{workload['metadata']['name']}: {exc}")
    return problems


def embedded_threads_problems(objs: list[Obj]) -> list[str]:
    """The embedded model's threads match the pod's CPU request: 0 ("all cores") would take the node's."""
    container = app_container(objs)
    env = container_env(objs, container)
    backends = {_value(env, "GUARDCHAT_LLM_BACKEND"), _value(env, "GUARDCHAT_GUARD_BACKEND")}
    if "embedded" not in backends and None not in backends:
        return []
    threads = int(_value(env, "GUARDCHAT_EMBEDDED_THREADS") or Settings.model_fields["embedded_threads"].default)
    cpu = _cpu_cores(container.get("resources", {}).get("requests", {}).get("cpu", "0"))
    if not 1 <= threads <= max(cpu, 1):
        return [f"GUARDCHAT_EMBEDDED_THREADS={threads} with a CPU request of {cpu} cores"]
    return []


def _cpu_cores(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def grace_problems(objs: list[Obj]) -> list[str]:
    """The kubelet's SIGKILL comes terminationGracePeriodSeconds after the preStop hook starts: it must cover
    the hook, the app's drain (GUARDCHAT_SHUTDOWN_GRACE_S) and the server's own shutdown."""
    deployment = app_deployment(objs)
    container = app_container(objs)
    env = container_env(objs, container)
    drain_s = float(_value(env, "GUARDCHAT_SHUTDOWN_GRACE_S") or Settings.model_fields["shutdown_grace_s"].default)
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = float(command[1]) if command[:1] == ["sleep"] else 0.0
    grace = pod_spec(deployment).get("terminationGracePeriodSeconds", 30)
    needed = pre_stop_s + drain_s + DRAIN_MARGIN_S
    if grace < needed:
        return [f"terminationGracePeriodSeconds {grace} < preStop {pre_stop_s} + drain {drain_s} + {DRAIN_MARGIN_S}"]
    return []


def secret_problems(objs: list[Obj], documented: set[tuple[str, str]]) -> list[str]:
    """Every Secret key a pod reads is created by the documented steps; the auth ones are mandatory."""
    refs = secret_refs(objs)
    missing = sorted(set(refs) - documented)
    problems = [f"secret {name} key {key} is not created in the docs" for name, key in missing]
    env = container_env(objs, app_container(objs))
    for name in ("GUARDCHAT_API_KEYS", "GUARDCHAT_ADMIN_TOKEN"):
        var = env.get(name)
        if var is None or var.secret is None or var.optional:
            problems.append(f"{name} must come from a mandatory Secret reference")
    return problems


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _match_expressions_hold(selector: Obj, labels: dict[str, str]) -> bool:
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        if expression["operator"] == "In" and value not in expression["values"]:
            return False
        if expression["operator"] == "NotIn" and value in expression["values"]:
            return False
    return _selects(selector.get("matchLabels", {}), labels) or not selector.get("matchLabels")


def reference_problems(objs: list[Obj]) -> list[str]:
    """Names that point at other objects resolve within the render (what the API server will not check)."""
    problems = []
    pods = {w["metadata"]["name"]: pod_labels(w) for w in workloads(objs)}
    for workload in workloads(objs):
        name = workload["metadata"]["name"]
        if not _selects(workload["spec"]["selector"]["matchLabels"], pod_labels(workload)):
            problems.append(f"{name}: selector does not match its own pod template")
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in pod_spec(workload).get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in claims and find(objs, "PersistentVolumeClaim", claim) is None:
                problems.append(f"{name}: volume claim {claim} is not rendered")
        for container in containers(workload, init=True):
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef", {}).get("name")
                if ref and find(objs, "ConfigMap", ref) is None:
                    problems.append(f"{name}: ConfigMap {ref} is not rendered")
    for service in of_kind(objs, "Service"):
        problems += _service_problems(objs, service)
    for kind in ("HorizontalPodAutoscaler",):
        for hpa in of_kind(objs, kind):
            target = hpa["spec"]["scaleTargetRef"]
            if find(objs, target["kind"], target["name"]) is None:
                problems.append(f"HPA {hpa['metadata']['name']}: {target['kind']}/{target['name']} is not rendered")
    for selecting in (*of_kind(objs, "PodDisruptionBudget"), *of_kind(objs, "NetworkPolicy")):
        selector = selecting["spec"].get("selector") or selecting["spec"].get("podSelector", {})
        if not any(_match_expressions_hold(selector, labels) for labels in pods.values()):
            problems.append(f"{selecting['kind']} {selecting['metadata']['name']}: selects no pod")
    return problems


def _service_problems(objs: list[Obj], service: Obj) -> list[str]:
    name = service["metadata"]["name"]
    backends = [w for w in workloads(objs) if _selects(service["spec"].get("selector", {}), pod_labels(w))]
    if not backends:
        return [f"Service {name}: selects no pod"]
    problems = []
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        for workload in backends:
            if not any(_port_number(c, target) is not None for c in containers(workload)):
                problems.append(f"Service {name}: target port {target} is not a port of {workload['metadata']['name']}")
    return problems


def service_url_problems(objs: list[Obj], url: str, what: str) -> list[str]:
    """A URL the app dials names a rendered Service and one of its ports."""
    parsed = urlparse(url)
    service = find(objs, "Service", parsed.hostname or "")
    if service is None:
        return [f"{what}: {parsed.hostname} is not a Service here"]
    if parsed.port not in {p["port"] for p in service["spec"]["ports"]}:
        return [f"{what}: Service {parsed.hostname} has no port {parsed.port}"]
    return []


def redis_problems(objs: list[Obj]) -> list[str]:
    """More than one replica needs Redis (sessions, rate limits, rails); an in-cluster URL must resolve."""
    var = container_env(objs, app_container(objs)).get("GUARDCHAT_REDIS_URL")
    if var is None:
        return ["GUARDCHAT_REDIS_URL is not set: each replica would keep its own sessions and rails"]
    if var.secret is not None:
        return ["GUARDCHAT_REDIS_URL from an optional Secret reference"] if var.optional else []
    return service_url_problems(objs, var.value or "", "GUARDCHAT_REDIS_URL")


def _trtllm_servers(objs: list[Obj]) -> list[tuple[Obj, Obj]]:
    return [
        (workload, container)
        for workload in workloads(objs)
        for container in containers(workload)
        if container.get("command", [""])[0] == "trtllm-serve"
    ]


def served_name(command: list[str]) -> str:
    """The model name trtllm-serve answers to: the basename of its MODEL path (TensorRT-LLM's OpenAIServer takes
    a directory's name; the pinned 1.0.0 CLI has no --served_model_name)."""
    return PurePosixPath(command[1]).name


def gpu_problems(objs: list[Obj]) -> list[str]:
    """GPU profile: the chat LLM and Llama Guard on trtllm-serve with a GPU each, and the app pointed at them."""
    env = container_env(objs, app_container(objs))
    problems = []
    if _value(env, "GUARDCHAT_LLM_BACKEND") != "trtllm" or _value(env, "GUARDCHAT_GUARD_BACKEND") != "openai":
        problems.append("the app must use GUARDCHAT_LLM_BACKEND=trtllm and GUARDCHAT_GUARD_BACKEND=openai")
    served = {}
    for workload, container in _trtllm_servers(objs):
        name = workload["metadata"]["name"]
        resources = container.get("resources", {})
        limit = resources.get("limits", {}).get(GPU)
        if int(limit or 0) < 1:
            problems.append(f"{name}: no {GPU} limit (extended resources are scheduled by their limit)")
        if resources.get("requests", {}).get(GPU, limit) != limit:
            problems.append(f"{name}: {GPU} request and limit differ")
        served[served_name(container["command"])] = (workload, container)
    for prefix in ("GUARDCHAT_LLM", "GUARDCHAT_GUARD"):
        url_var, model_var = f"{prefix}_URL", f"{prefix}_MODEL"
        model, url = _value(env, model_var), _value(env, url_var) or ""
        if model not in served:
            problems.append(f"{model_var}={model} is served by no trtllm-serve Deployment")
            continue
        problems += service_url_problems(objs, url, url_var)
        service = find(objs, "Service", urlparse(url).hostname or "")
        workload, _ = served[model]
        if service is not None and not _selects(service["spec"]["selector"], pod_labels(workload)):
            problems.append(f"{url_var} reaches Service {service['metadata']['name']}, not the pods serving {model}")
    return problems


def gpu_requested(objs: list[Obj]) -> list[str]:
    """Workloads asking for a GPU (the CPU profiles must run on nodes without one)."""
    return [
        w["metadata"]["name"]
        for w in workloads(objs)
        for c in containers(w, init=True)
        if GPU in {**c.get("resources", {}).get("requests", {}), **c.get("resources", {}).get("limits", {})}
    ]


def autoscaling_problems(objs: list[Obj]) -> list[str]:
    """The HPA drives the app Deployment on CPU utilisation, which is relative to the CPU request."""
    hpa = find(objs, "HorizontalPodAutoscaler", app_deployment(objs)["metadata"]["name"])
    if hpa is None:
        return ["no HorizontalPodAutoscaler for the app"]
    problems = []
    replicas, minimum = app_deployment(objs)["spec"].get("replicas", 1), hpa["spec"]["minReplicas"]
    if replicas != minimum or minimum < 2:
        problems.append(f"Deployment replicas {replicas} and HPA minimum {minimum}: equal, and 2 or more")
    if "cpu" not in app_container(objs).get("resources", {}).get("requests", {}):
        problems.append("the app container has no CPU request, so CPU utilisation is undefined")
    return problems
