"""The GPU install and the GPU model servers, checked as data (no Docker engine and no GPU here).

- One FAISS per install: faiss-cpu and faiss-gpu ship the same `faiss` module, so no install may ask for both.
  The base dependencies pin faiss-cpu (`make run`/`make test`); the GPU image swaps it for faiss-gpu of the
  same release (Dockerfile, GPU=1); no extra names a FAISS at all (an extra cannot remove a base dependency).
- Every trtllm-serve flag in docker-compose.yml, deploy/kubernetes and the docs is one the pinned TensorRT-LLM
  release's CLI has (tensorrt_llm/commands/serve.py).
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.settings import PROJECT_ROOT

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
DOCKERFILE = (PROJECT_ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
FAISS_DISTRIBUTIONS = {"faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12", "faiss-gpu-cuvs", "faiss-cuda"}

# trtllm-serve's options in TensorRT-LLM 1.0.0 (compose and Kubernetes run nvcr.io/nvidia/tensorrt-llm/release:1.0.0):
# those both in the 0.18.2 CLI reference and in tensorrt_llm/commands/serve.py of a later (1.1 pre-release)
# source, so in 1.0.0 too. Neither has --served_model_name: the served name is the MODEL path's basename.
TRTLLM_SERVE_FLAGS = {
    "--tokenizer", "--host", "--port", "--backend", "--max_beam_width", "--max_batch_size", "--max_num_tokens",
    "--max_seq_len", "--tp_size", "--pp_size", "--kv_cache_free_gpu_memory_fraction", "--trust_remote_code",
}
TRTLLM_BACKENDS = {"pytorch", "tensorrt", "trt", "_autodeploy"}


def _faiss_requirements(requirements: list[str]) -> list[Requirement]:
    return [r for r in map(Requirement, requirements) if canonicalize_name(r.name) in FAISS_DISTRIBUTIONS]


def test_the_base_install_pins_exactly_one_faiss_and_no_extra_adds_another() -> None:
    (faiss,) = _faiss_requirements(PYPROJECT["dependencies"])
    assert faiss.name == "faiss-cpu" and str(faiss.specifier).startswith("=="), faiss
    for extra, requirements in PYPROJECT.get("optional-dependencies", {}).items():
        assert not _faiss_requirements(requirements), f"[{extra}] would install a second faiss next to faiss-cpu"


def test_this_environment_has_one_distribution_providing_the_faiss_module() -> None:
    providers = metadata.packages_distributions().get("faiss", [])
    assert len(providers) == 1, f"the `faiss` module comes from {providers}: one overwrote the other"
    (faiss,) = _faiss_requirements(PYPROJECT["dependencies"])
    assert canonicalize_name(providers[0]) == canonicalize_name(faiss.name)
    assert faiss.specifier.contains(metadata.version(providers[0]))


def _logical_lines(text: str) -> list[str]:
    """Dockerfile instructions with their continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [line.strip() for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if line.strip()]


def test_the_gpu_image_swaps_faiss_cpu_for_faiss_gpu_of_the_same_release() -> None:
    lines = _logical_lines(DOCKERFILE)
    (faiss,) = _faiss_requirements(PYPROJECT["dependencies"])
    version = str(faiss.specifier).removeprefix("==")
    assert "ARG GPU=0" in lines, "the CPU image stays the default"
    package = lines.index("RUN pip install .")
    (swap,) = [i for i, line in enumerate(lines) if "faiss-gpu" in line]
    assert swap > package, "faiss-gpu after the package (which installs faiss-cpu)"
    swap_command = f"pip uninstall -y faiss-cpu && pip install faiss-gpu=={version}"
    assert lines[swap] == f'RUN if [ "$GPU" = "1" ]; then {swap_command}; fi', lines[swap]
    torch_pin = next(r for r in map(Requirement, PYPROJECT["dependencies"]) if r.name == "torch").specifier
    (torch_line,) = [line for line in lines if "torch==" in line and line.startswith("RUN")]
    assert torch_line.count(f"torch{torch_pin}") == 2 and "download.pytorch.org/whl/cpu" in torch_line


def test_the_compose_gpu_app_is_the_gpu_build_with_a_gpu() -> None:
    app = COMPOSE["services"]["app-gpu"]
    assert app["build"]["args"]["GPU"] == "1"
    devices = app["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def _compose_and_kubernetes_commands() -> list[list[str]]:
    commands = [s["command"] for s in COMPOSE["services"].values() if s.get("command", [""])[0] == "trtllm-serve"]
    for path in sorted((PROJECT_ROOT / "deploy" / "kubernetes").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            commands += [c["command"] for c in _containers(doc) if c.get("command", [""])[0] == "trtllm-serve"]
    return commands


def _containers(doc: Any) -> list[dict[str, Any]]:
    spec = ((doc or {}).get("spec") or {}).get("template", {}).get("spec", {}) if isinstance(doc, dict) else {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _documented_commands() -> list[tuple[str, str]]:
    """(file, command) for each trtllm-serve command inside a code span or block of the docs."""
    found = []
    for path in [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        spans = re.findall(r"```.*?```|`[^`]+`", text, flags=re.DOTALL)
        for span in spans:
            joined = re.sub(r"\\\n", " ", span.strip("`"))
            found += [(path.name, m) for m in re.findall(r"trtllm-serve [^\n`]*", joined)]
    return found


def test_every_trtllm_serve_flag_is_one_the_pinned_release_has() -> None:
    commands = [(" ".join(c), c) for c in _compose_and_kubernetes_commands()]
    assert len(commands) >= 4, "compose and Kubernetes each run the LLM and the guard on trtllm-serve"
    for joined, command in commands:
        assert not command[1].startswith("-"), f"MODEL first: {joined}"
        if "--backend" in command:
            assert command[command.index("--backend") + 1] in TRTLLM_BACKENDS, joined
    documented = _documented_commands()
    assert any(name == "deployment.md" for name, _ in documented)
    for where, text in [("compose/kubernetes", joined) for joined, _ in commands] + documented:
        unknown = set(re.findall(r"--[a-z_]+", text)) - TRTLLM_SERVE_FLAGS
        assert not unknown, f"{unknown} in `{text}` ({where}) is no trtllm-serve 1.0.0 option"


def test_the_flag_check_catches_a_flag_the_release_lacks() -> None:
    assert set(re.findall(r"--[a-z_]+", "trtllm-serve /m --served_model_name x --port 1")) - TRTLLM_SERVE_FLAGS == {
        "--served_model_name"
    }


def test_image_pins_agree() -> None:
    images = {s["image"] for s in COMPOSE["services"].values() if "tensorrt-llm" in s.get("image", "")}
    assert images == {"${TRTLLM_IMAGE:-nvcr.io/nvidia/tensorrt-llm/release:1.0.0}"}
    kustomization = yaml.safe_load((PROJECT_ROOT / "deploy/kubernetes/components/gpu/kustomization.yaml").read_text())
    (trtllm,) = [i for i in kustomization["images"] if i["name"] == "tensorrt-llm"]
    assert (trtllm["newName"], trtllm["newTag"]) == ("nvcr.io/nvidia/tensorrt-llm/release", "1.0.0")
