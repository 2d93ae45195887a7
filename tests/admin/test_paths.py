from pathlib import Path

import pytest

from app.admin.paths import FileLimits, check_files, read_rails_dir
from app.admin.publisher import RailsInvalid
from app.admin.versions import FileRailsVersionStore
from tests.admin.helpers import BASE_FILES, initial_live, make_publisher

OK = "x: 1\n"


def test_a_normal_config_passes() -> None:
    assert check_files({**BASE_FILES, "flows/greeting.co": "define flow greeting\n", "tests/t1.yaml": OK}) == []


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/etc/passwd.yml", "absolute"),
        ("C:/rails/config.yml", "absolute"),
        ("../config.yml", "'..'"),
        ("flows/../../config.yml", "'..'"),
        ("flows\\a.co", "backslash"),
        ("a\x00.yml", "NUL"),
        ("a\n.yml", "control"),
        ("./config.yml", "normalized"),
        ("flows//a.co", "normalized"),
        ("flows/", "normalized"),
        ("", "empty"),
        (".hidden.yml", "hidden"),
        ("flows/.secret/a.co", "hidden"),
        ("actions.py", "only"),
        ("config.yml.sh", "only"),
        ("README", "only"),
        ("x" * 300 + ".yml", "longer"),
    ],
)
def test_rejected_paths(path: str, reason: str) -> None:
    errors = check_files({"config.yml": OK, path: OK})
    assert [e.file for e in errors] == [path]
    assert reason in errors[0].message


def test_file_and_directory_with_the_same_name() -> None:
    errors = check_files({"a.yml": OK, "a.yml/b.co": OK})
    assert {e.file for e in errors} == {"a.yml"}


def test_size_count_and_total_limits() -> None:
    limits = FileLimits(max_file_bytes=10, max_files=3, max_total_bytes=25)
    assert check_files({"a.yml": "é" * 5}, limits) == []  # 10 bytes in UTF-8: exactly at the limit
    too_big = check_files({"a.yml": "é" * 6}, limits)
    assert too_big[0].file == "a.yml" and "12 bytes" in too_big[0].message
    too_many = check_files({f"f{i}.txt": "" for i in range(4)}, limits)
    assert "too many files" in too_many[0].message
    total = check_files({"a.txt": "x" * 10, "b.txt": "x" * 10, "c.txt": "x" * 10}, limits)
    assert len(total) == 1 and "in total" in total[0].message


def test_empty_config_and_bad_content() -> None:
    assert check_files({})[0].message == "the rails config has no files"
    assert "NUL" in check_files({"a.yml": "x\x00"})[0].message
    assert "string" in check_files({"a.yml": 3})[0].message


def test_read_rails_dir_skips_what_the_api_would_reject(tmp_path: Path) -> None:
    (tmp_path / "flows").mkdir()
    (tmp_path / "config.yml").write_text(OK)
    (tmp_path / "flows" / "a.co").write_text("define flow a\n")
    (tmp_path / "actions.py").write_text("import os\n")
    (tmp_path / ".env.yml").write_text("secret: 1\n")
    assert read_rails_dir(tmp_path) == {"config.yml": OK, "flows/a.co": "define flow a\n"}
    assert read_rails_dir(tmp_path / "missing") == {}


async def test_publisher_writes_nothing_on_a_path_rejection(tmp_path: Path) -> None:
    store = FileRailsVersionStore(tmp_path / "store")
    await store.ensure_seeded(BASE_FILES)
    live = initial_live()
    publisher = make_publisher(store, live)
    before = sorted(p.name for p in (tmp_path / "store" / "versions").iterdir())
    with pytest.raises(RailsInvalid) as caught:
        await publisher.publish(1, {**BASE_FILES, "../escape.yml": OK}, "bad", "alice")
    assert caught.value.outcome.errors[0]["file"] == "../escape.yml"
    assert sorted(p.name for p in (tmp_path / "store" / "versions").iterdir()) == before
    assert not (tmp_path / "escape.yml").exists()
    assert await store.live_number() == 1 and live.current.version == "disk"
