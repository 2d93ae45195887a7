"""Loading one rails config (a directory or in-memory files) into NeMo's RailsConfig plus our own
`guardchat:` section, reporting every problem as file:line.

We never hand NeMo a directory: it would import a config.py / actions.py found there, and rails
are admin-editable text, not code. Files are read into a dict and parsed here instead, with NeMo's
own Colang parser and merge rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import app.guard  # noqa: F401  (sets the NeMo telemetry opt-out before nemoguardrails is imported)
from app.guard.base import AssistantTexts
from app.guard.llama_guard import DEFAULT_CATEGORIES, SafetyCategory
from app.guard.thresholds import Thresholds

CONFIG_SUFFIXES = (".yml", ".yaml", ".co")
TESTS_DIR = "tests"

# The bot messages the engine itself needs; every other refusal lives only in the flows.
TEXT_MESSAGES = {"refusal": "refuse to respond", "idk": "inform idk", "guard_error": "inform guard error"}


@dataclass
class ConfigProblem:
    file: str | None
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.file and self.line else (self.file or "rails")
        return f"{where}: {self.message}"


class RailsConfigError(Exception):
    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


class CategorySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""


class IntentRailSpec(BaseModel):
    """An example-matching rail: the nearest `define user` example decides, against the allowed ones."""

    model_config = ConfigDict(extra="forbid")
    blocked_intents: list[str] = Field(default_factory=list)
    allowed_intents: list[str] = Field(default_factory=list)
    min_similarity: float = Field(default=0.6, ge=0, le=1)
    margin: float = Field(default=0.05, ge=0, le=1)
    # detector topic label -> the blocked intent it stands for (topic rail only)
    detector_labels: dict[str, str] = Field(default_factory=dict)
    # blocked intent -> the Llama Guard category it reports (safety rail only)
    categories: dict[str, str] = Field(default_factory=dict)


class GroundednessSpec(BaseModel):
    """The groundedness output rail: what an answer not supported by the retrieved text gets."""

    model_config = ConfigDict(extra="forbid")
    # What an answer whose sentences score below `threshold` similarity gets. flag: recorded in the trace, the
    # answer stands; block: the answer is replaced by the "I don't know" text (checked per hold-back window
    # while streaming, so no unsupported text is shown).
    action: Literal["flag", "block"] = "flag"
    threshold: float = Field(default=0.35, ge=0, le=1)  # best cosine of a claim sentence to any chunk
    # What a sentence stating an amount, number, time or named policy that no source (nor the question, nor
    # the contact line) holds gets (app/rag/facts.py): block unless the config says otherwise.
    facts: Literal["flag", "block"] = "block"
    # With action=block, ask the chat LLM to confirm before blocking (only for low-similarity answers).
    judge: bool = True


class GuardchatSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    llama_guard_categories: dict[str, CategorySpec] = Field(
        default_factory=lambda: {code: CategorySpec(name=name) for code, name in DEFAULT_CATEGORIES.items()}
    )
    thresholds: dict[str, float] = Field(default_factory=dict)
    topic: IntentRailSpec = Field(default_factory=lambda: IntentRailSpec())
    attack: IntentRailSpec = Field(default_factory=lambda: IntentRailSpec())
    safety: IntentRailSpec = Field(default_factory=lambda: IntentRailSpec())
    groundedness: GroundednessSpec = Field(default_factory=lambda: GroundednessSpec())

    @field_validator("llama_guard_categories")
    @classmethod
    def _codes(cls, value: dict[str, CategorySpec]) -> dict[str, CategorySpec]:
        bad = [code for code in value if not re.fullmatch(r"S\d{1,2}", code)]
        if bad:
            raise ValueError(f"category codes must look like S1..S99, got {bad}")
        if not value:
            raise ValueError("at least one Llama Guard category must be in force")
        return value

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        known = set(Thresholds.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown thresholds {unknown}; known: {sorted(known)}")
        return value


@dataclass
class LoadedConfig:
    """Everything built from one rails config, once."""

    rails_config: Any  # nemoguardrails RailsConfig
    section: GuardchatSection
    texts: AssistantTexts
    categories: list[SafetyCategory]
    user_examples: dict[str, list[str]]  # intent -> examples, from the Colang `define user` blocks
    files: dict[str, str] = field(default_factory=dict)


def read_rails_files(source: Path | dict[str, str]) -> dict[str, str]:
    """Relative POSIX path -> text for every config and test file (also anything else, so that the
    validator can complain about it)."""
    if isinstance(source, dict):
        return dict(source)
    root = Path(source)
    if not root.is_dir():
        raise RailsConfigError([ConfigProblem(str(root), None, "rails config directory does not exist")])
    return {
        p.relative_to(root).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith((".", "__")) for part in p.relative_to(root).parts)
    }


def config_files(files: dict[str, str]) -> dict[str, str]:
    return {n: t for n, t in files.items() if n.endswith(CONFIG_SUFFIXES) and not n.startswith(TESTS_DIR + "/")}


def yaml_line(text: str, path: tuple[str | int, ...]) -> int | None:
    """1-based line of the node at `path` (keys/indices) in a YAML text, or of its deepest parent."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = node.start_mark.line + 1 if node is not None else None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == str(key)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _parse_yaml(name: str, text: str, problems: list[ConfigProblem]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        context = getattr(exc, "context_mark", None)
        opened = (
            f" ({getattr(exc, 'context', '')} at line {context.line + 1})"
            if context is not None and getattr(exc, "context", None)
            else ""
        )
        problems.append(ConfigProblem(name, line, f"invalid YAML: {getattr(exc, 'problem', None) or exc}{opened}"))
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(ConfigProblem(name, 1, "a rails YAML file must be a mapping"))
        return {}
    return data


def _parse_colang(name: str, text: str, problems: list[ConfigProblem]) -> dict[str, Any]:
    from nemoguardrails.colang import parse_colang_file

    try:
        return parse_colang_file(name, content=text, version="1.0") or {}
    except Exception as exc:  # NeMo's v1 parser raises bare Exceptions that name the line
        match = re.search(r"line (\d+)", str(exc))
        problems.append(ConfigProblem(name, int(match.group(1)) if match else None, f"Colang: {exc}"))
        return {}


def load_config(source: Path | dict[str, str], embedding_model_path: str) -> LoadedConfig:
    """Parse and merge a rails config. Raises RailsConfigError listing every problem found."""
    from nemoguardrails import RailsConfig
    from nemoguardrails.rails.llm.config import _join_config  # NeMo's own multi-file merge rules

    files = read_rails_files(source)
    problems: list[ConfigProblem] = []
    for name in files:
        if name.endswith(".py"):
            problems.append(ConfigProblem(name, None, "python files are not allowed in a rails config"))
    raw: dict[str, Any] = {}
    section_raw: dict[str, Any] = {}
    section_file: tuple[str, str] | None = None
    cfg_files = config_files(files)
    if not any(n.endswith(".co") for n in cfg_files):
        problems.append(ConfigProblem(None, None, "the rails config has no Colang (.co) files"))
    for name, text in cfg_files.items():
        if name.endswith(".co"):
            continue
        data = _parse_yaml(name, text, problems)
        if "guardchat" in data:
            section_raw, section_file = data.pop("guardchat") or {}, (name, text)
        if data.get("colang_version", "1.0") != "1.0":
            problems.append(ConfigProblem(name, yaml_line(text, ("colang_version",)), "only Colang 1.0 is supported"))
        _join_config(raw, data)
    for name, text in cfg_files.items():
        if name.endswith(".co"):
            _join_config(raw, _parse_colang(name, text, problems))

    try:
        section = GuardchatSection.model_validate(section_raw)
    except ValidationError as exc:
        section = GuardchatSection()
        for err in exc.errors():
            loc = ("guardchat", *err["loc"])
            file, line = (section_file[0], yaml_line(section_file[1], loc)) if section_file else (None, None)
            problems.append(ConfigProblem(file, line, f"{'.'.join(map(str, loc))}: {err['msg']}"))

    # The machine-specific embedding model is injected here, never written into rails/config.yml,
    # and never FastEmbed (which downloads from a hub).
    raw["models"] = [m for m in raw.get("models", []) if m.get("type") != "embeddings"]
    raw["models"].append({"type": "embeddings", "engine": "SentenceTransformers", "model": embedding_model_path})
    rails_config = None
    if not problems:
        try:
            rails_config = RailsConfig.parse_object(raw)
        except Exception as exc:
            problems.append(ConfigProblem(None, None, f"NeMo rejected the config: {exc}"))

    user_examples = {k: list(v) for k, v in (raw.get("user_messages") or {}).items()}
    bot_messages = raw.get("bot_messages") or {}
    _check_references(section, user_examples, bot_messages, raw, problems)
    if problems:
        raise RailsConfigError(problems)

    texts = AssistantTexts(
        system_prompt=_system_prompt(raw) or AssistantTexts.system_prompt,
        **{attr: str(bot_messages[msg][0]).strip() for attr, msg in TEXT_MESSAGES.items()},
    )
    categories = [
        SafetyCategory(code, spec.name, spec.description) for code, spec in section.llama_guard_categories.items()
    ]
    return LoadedConfig(rails_config, section, texts, categories, user_examples, files)


def _system_prompt(raw: dict[str, Any]) -> str:
    return "\n".join(
        str(i.get("content", "")).strip() for i in raw.get("instructions", []) if i.get("type", "general") == "general"
    ).strip()


def _check_references(
    section: GuardchatSection,
    user_examples: dict[str, list[str]],
    bot_messages: dict[str, Any],
    raw: dict[str, Any],
    problems: list[ConfigProblem],
) -> None:
    for attr, msg in TEXT_MESSAGES.items():
        if not bot_messages.get(msg):
            problems.append(ConfigProblem(None, None, f"missing `define bot {msg}` (the {attr} text)"))
    for rail_name, spec in (("topic", section.topic), ("attack", section.attack), ("safety", section.safety)):
        for intent in [*spec.blocked_intents, *spec.allowed_intents, *spec.detector_labels.values(), *spec.categories]:
            if not user_examples.get(intent):
                problems.append(
                    ConfigProblem(
                        None, None, f"guardchat.{rail_name} names `{intent}`, which has no `define user` examples"
                    )
                )
    for intent, code in section.safety.categories.items():
        if code not in section.llama_guard_categories:
            problems.append(
                ConfigProblem(None, None, f"guardchat.safety.categories: `{intent}` maps to unknown {code}")
            )
