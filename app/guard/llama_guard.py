"""Llama Guard 3: the prompt (Meta's official format), a strict parser of its answer, and a client.

The same prompt serves two judges:
- remote: a real Llama Guard 3 behind an OpenAI-compatible server, asked over /v1/completions with
  the raw prompt (the chat template would wrap it a second time) and `add_special_tokens: false`. The
  prompt begins with `<|begin_of_text|>`, and Llama Guard 3's tokenizer (Llama 3.1's) prepends that BOS
  itself when asked to add special tokens, which /v1/completions does by default on trtllm-serve and vLLM
  (their CompletionRequest: `add_special_tokens` defaults to true, the chat route's to false). Without the
  flag the model would read two BOS tokens (tests/guard/test_llama_guard_wire.py);
- embedded: the embedded llama.cpp model, with a GBNF grammar that can only produce a well-formed
  Llama Guard answer over the categories in force.

Anything that is not exactly `safe` or `unsafe` + known categories is a parse error, and a parse
error is a guard error: the caller fails closed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from app.llm.base import ChatBackend, GenerationOptions, LLMError

Role = Literal["User", "Agent"]

# Meta's Llama Guard 3 taxonomy (model card). The rails config chooses which are in force and may
# add a description under a name (llama-recipes' "custom categories" format).
DEFAULT_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}


class GuardBackendError(Exception):
    """A judge could not give a usable verdict (down, timeout, garbage). Callers fail closed."""


@dataclass(frozen=True)
class SafetyCategory:
    code: str  # "S1"
    name: str  # "Violent Crimes"
    description: str = ""  # optional policy wording shown under the name


@dataclass
class LlamaGuardVerdict:
    safe: bool
    categories: list[str] = field(default_factory=list)
    raw: str = ""
    latency_ms: float = 0.0


# Special tokens and the prompt's own section markers must not be forgeable from inside a message:
# a user could otherwise close the conversation block and write their own assessment instructions.
_SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>")
_SECTION_MARKER = re.compile(r"<\s*(BEGIN|END)\s+(UNSAFE CONTENT CATEGORIES|CONVERSATION)\s*>", re.IGNORECASE)


def _sanitize(text: str) -> str:
    text = _SPECIAL_TOKEN.sub("", text)
    return _SECTION_MARKER.sub(lambda m: f"[{m.group(1)} {m.group(2)}]", text).strip()


# What the embedded judge reads of a conversation, in characters (~4 per token). Prompt evaluation of the
# 1.5B judge on 2 busy CPU cores runs at roughly 60-150 tokens/s, so a 6,000-character jailbreak template
# (~1,500 tokens) cannot be judged within guard_timeout_s=10 and would fail closed; measured with 2,000
# characters, 6-30 s; with 1,200, 3-5 s (a cold category header adds more). The detector has already
# scored every window of the full text; the judge sees the head (the framing) and the tail (where
# templates put the request) of an over-long message, with an explicit omission marker.
EMBEDDED_JUDGE_BUDGET_CHARS = 1200
HEAD_SHARE = 0.4
_MIN_TURN_CHARS = 200


def clip_text(text: str, limit: int) -> str:
    """`text` if it fits in `limit` characters, else its head and tail around an omission marker."""
    if len(text) <= limit:
        return text
    marker = "\n[... {} characters omitted ...]\n"
    room = max(limit - len(marker.format(len(text))), 2)
    head = int(room * HEAD_SHARE)
    tail = room - head
    return text[:head].rstrip() + marker.format(len(text) - head - tail) + text[len(text) - tail :].lstrip()


def fit_conversation(conversation: Sequence[tuple[Role, str]], budget_chars: int) -> list[tuple[Role, str]]:
    """Clip a conversation to ~`budget_chars`: the assessed (last) turn first, up to the whole budget, then
    earlier turns newest first with what is left (at least _MIN_TURN_CHARS each, so no turn vanishes)."""
    out: list[tuple[Role, str]] = []
    left = budget_chars
    for who, text in reversed(conversation):
        clipped = clip_text(text, max(left, _MIN_TURN_CHARS))
        left -= len(clipped)
        out.append((who, clipped))
    return out[::-1]


def build_prompt(
    conversation: Sequence[tuple[Role, str]], categories: Sequence[SafetyCategory], role: Role | None = None
) -> str:
    """The exact Llama Guard 3 prompt. `conversation` is (role, text) turns; the assessment is of the
    last one, whose role is `role` (defaults to the last turn's role)."""
    if not conversation:
        raise ValueError("Llama Guard needs at least one message to assess")
    role = role or conversation[-1][0]
    category_lines = "\n".join(
        f"{c.code}: {c.name}.\n{c.description.strip()}" if c.description.strip() else f"{c.code}: {c.name}."
        for c in categories
    )
    turns = "\n\n".join(f"{who}: {_sanitize(text)}" for who, text in conversation)
    return (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
        "policy with the below categories.\n\n"
        "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
        f"{category_lines}\n"
        "<END UNSAFE CONTENT CATEGORIES>\n\n"
        "<BEGIN CONVERSATION>\n\n"
        f"{turns}\n\n"
        "<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories."
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def conversation_from_messages(
    messages: Sequence[Mapping[str, str]], answer: str | None = None
) -> list[tuple[Role, str]]:
    """OpenAI-style messages -> Llama Guard turns. System messages are not part of what is judged.
    For an input check pass no `answer`: the model card says the agent reply must then be absent."""
    turns: list[tuple[Role, str]] = []
    for message in messages:
        content = message.get("content") or ""
        if message.get("role") == "user":
            turns.append(("User", content))
        elif message.get("role") == "assistant":
            turns.append(("Agent", content))
    if answer is not None:
        turns.append(("Agent", answer))
    return turns


def parse_verdict(raw: str, allowed_codes: Sequence[str]) -> LlamaGuardVerdict:
    """`safe` | `unsafe\\nS1,S2` (whitespace-tolerant). Raises GuardBackendError on anything else."""
    lines = [line.strip() for line in raw.strip().splitlines() if line.strip()]
    if not lines:
        raise GuardBackendError("llama guard answered with an empty completion")
    head = lines[0].lower()
    if head == "safe" and len(lines) == 1:
        return LlamaGuardVerdict(safe=True, raw=raw)
    if head != "unsafe":
        raise GuardBackendError(f"llama guard answer is not 'safe'/'unsafe': {raw[:80]!r}")
    if len(lines) != 2:
        raise GuardBackendError(f"llama guard said unsafe without exactly one category line: {raw[:80]!r}")
    codes = [code.strip().upper() for code in lines[1].split(",")]
    unknown = [code for code in codes if code not in allowed_codes]
    if not codes or unknown:
        raise GuardBackendError(f"llama guard named unknown categories {unknown or codes}: {raw[:80]!r}")
    return LlamaGuardVerdict(safe=False, categories=list(dict.fromkeys(codes)), raw=raw)


MAX_VERDICT_CATEGORIES = 3


def verdict_grammar(codes: Sequence[str]) -> str:
    """GBNF that admits exactly the well-formed answers over `codes` (longest codes first so S10
    is tried before S1 by backtracking-free samplers). At most MAX_VERDICT_CATEGORIES codes: a small
    judge otherwise sometimes lists every code until max_tokens cuts it mid-code (a parse error)."""
    alternatives = " | ".join(f'"{code}"' for code in sorted(codes, key=lambda c: (-len(c), c)))
    more = ' ("," cat)?' * (MAX_VERDICT_CATEGORIES - 1)
    return f'root ::= "safe" | "unsafe\\n" cats\ncats ::= cat{more}\ncat ::= {alternatives}\n'


class LlamaGuardClient:
    """Asks one backend for a Llama Guard verdict. `use_grammar` for the embedded judge."""

    def __init__(
        self,
        backend: ChatBackend,
        categories: Sequence[SafetyCategory],
        *,
        timeout_s: float = 10.0,
        use_grammar: bool = False,
        max_tokens: int = 24,
        budget_chars: int | None = None,
        verbatim_prompt: bool | None = None,
    ) -> None:
        """`budget_chars`: clip what the judge reads (fit_conversation); by default the embedded judge
        (`use_grammar`) reads EMBEDDED_JUDGE_BUDGET_CHARS and a remote Llama Guard (GPU, 8k context) all.
        `verbatim_prompt` (default: a remote judge, i.e. not `use_grammar`): ask the server to tokenize the
        prompt as written, adding no BOS of its own, since the prompt carries Llama Guard's one BOS."""
        if not categories:
            raise ValueError("Llama Guard needs at least one category in force")
        self.backend = backend
        self.categories = list(categories)
        self.codes = [c.code for c in self.categories]
        self.timeout_s = timeout_s
        self.budget_chars = (
            budget_chars if budget_chars is not None else (EMBEDDED_JUDGE_BUDGET_CHARS if use_grammar else None)
        )
        # Built once: the options (and the grammar in them) are the same for every call.
        verbatim = not use_grammar if verbatim_prompt is None else verbatim_prompt
        self._options = GenerationOptions(
            max_tokens=max_tokens,
            temperature=0.0,
            grammar=verdict_grammar(self.codes) if use_grammar else None,
            extra={"add_special_tokens": False} if verbatim else {},
        )

    async def check(self, conversation: Sequence[tuple[Role, str]], role: Role | None = None) -> LlamaGuardVerdict:
        if self.budget_chars is not None:
            conversation = fit_conversation(conversation, self.budget_chars)
        prompt = build_prompt(conversation, self.categories, role)
        started = time.perf_counter()
        try:
            completion = await asyncio.wait_for(self.backend.complete_prompt(prompt, self._options), self.timeout_s)
        except TimeoutError as exc:
            raise GuardBackendError(f"llama guard timed out after {self.timeout_s:g}s") from exc
        except LLMError as exc:
            raise GuardBackendError(f"llama guard backend failed ({type(exc).__name__}): {exc}") from exc
        except Exception as exc:  # any other client failure is still a guard that could not run
            raise GuardBackendError(f"llama guard call failed ({type(exc).__name__}): {exc}") from exc
        verdict = parse_verdict(completion.text, self.codes)
        verdict.latency_ms = (time.perf_counter() - started) * 1000
        return verdict
