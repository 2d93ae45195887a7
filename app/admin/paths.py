"""Checks the file map an admin submits before anything else touches it.

A rails config is a flat `{relative/path: text}` map. Everything here is a pure check: the caller
answers 422 with the returned errors and writes nothing when the list is non-empty.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ALLOWED_SUFFIXES: tuple[str, ...] = (".yml", ".yaml", ".co", ".txt", ".md")


@dataclass(frozen=True)
class FileLimits:
    max_file_bytes: int = 256 * 1024
    max_files: int = 200
    max_total_bytes: int = 4 * 1024 * 1024
    max_path_chars: int = 200


DEFAULT_LIMITS = FileLimits()


@dataclass(frozen=True)
class PathError:
    file: str
    message: str
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _path_problem(path: str, limits: FileLimits) -> str | None:
    """Why `path` is not an acceptable rails file path, or None."""
    if not path:
        return "empty path"
    if len(path) > limits.max_path_chars:
        return f"path longer than {limits.max_path_chars} characters"
    if "\x00" in path:
        return "path contains a NUL byte"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        return "path contains control characters"
    if "\\" in path:
        return "backslashes are not allowed; use '/'"
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return "absolute paths are not allowed"
    segments = path.split("/")
    if ".." in segments:
        return "'..' is not allowed"
    # normpath folds "a//b", "./a" and "a/" — a path must already be in that folded form, so two
    # spellings can never name the same file.
    if posixpath.normpath(path) != path or "" in segments or "." in segments:
        return "path is not normalized"
    if any(seg.startswith(".") for seg in segments):
        return "hidden files and directories are not allowed"
    if not path.lower().endswith(ALLOWED_SUFFIXES):
        return "only " + " ".join(ALLOWED_SUFFIXES) + " files are allowed"
    return None


def check_files(files: Mapping[Any, Any], limits: FileLimits = DEFAULT_LIMITS) -> list[PathError]:
    """Every problem with the paths, types and sizes in `files` (empty list = acceptable)."""
    errors: list[PathError] = []
    if not files:
        return [PathError("", "the rails config has no files")]
    if len(files) > limits.max_files:
        errors.append(PathError("", f"too many files: {len(files)} > {limits.max_files}"))
    total = 0
    for path, content in files.items():
        if not isinstance(path, str):
            errors.append(PathError(str(path), "path must be a string"))
            continue
        problem = _path_problem(path, limits)
        if problem:
            errors.append(PathError(path, problem))
        if not isinstance(content, str):
            errors.append(PathError(path, "content must be a string"))
            continue
        if "\x00" in content:
            errors.append(PathError(path, "content contains a NUL byte"))
        size = len(content.encode("utf-8", errors="surrogatepass"))
        total += size
        if size > limits.max_file_bytes:
            errors.append(PathError(path, f"file is {size} bytes; the limit is {limits.max_file_bytes}"))
    # "a.yml" and "a.yml/b.co" cannot both exist on a disk (validation writes the config to a directory).
    dirs = {posixpath.dirname(p) for p in files if isinstance(p, str)} - {""}
    for path in files:
        if path and isinstance(path, str) and any(d == path or d.startswith(path + "/") for d in dirs):
            errors.append(PathError(path, "path is both a file and a directory"))
    if total > limits.max_total_bytes:
        errors.append(PathError("", f"config is {total} bytes in total; the limit is {limits.max_total_bytes}"))
    return errors


def read_rails_dir(rails_dir: Path, limits: FileLimits = DEFAULT_LIMITS) -> dict[str, str]:
    """The acceptable rails files under `rails_dir` as `{posix relative path: text}` (seeds version 1).

    Files the admin API would reject (other suffixes, hidden files) are skipped, so the seed is
    always a config that could have been published.
    """
    files: dict[str, str] = {}
    if not rails_dir.is_dir():
        return files
    for file in sorted(rails_dir.rglob("*")):
        if not file.is_file():
            continue
        rel = file.relative_to(rails_dir).as_posix()
        if _path_problem(rel, limits) is None:
            files[rel] = file.read_text(encoding="utf-8")
    return files
