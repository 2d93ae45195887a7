"""Short requests hidden in long benign prose: does the guard still see them?

A customer (or a document pasted into the chat) can bury a harmful request, an injected instruction or a system-prompt
extraction at the start, the middle or the end of ordinary text. This probe takes the held-out short texts of
app/eval/data/guard_heldout.jsonl (never trained on), hides each in prose at each of the three places, and scores
every text with the guard model alone (its block thresholds, no rails):

- the prose: paragraphs of the shipped knowledge base (bank prose, which trains as benign text) and of the installed
  Python packages' descriptions (technical prose the guard never trained on; this repository's docs/ would be no
  neutral prose: they talk of jailbreaks, injections and system prompts, and the guard refuses them);
- 20-150 words of it around the payload, the payload always inside the window the guard reads (its head and tail
  tokens: a payload the guard cannot see is no test of it);
- the benign rows of the same file hidden the same way measure the price: a long text must not be refused because
  it is long.

    python -m app.eval.hidden_payload [--model DIR] [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any

from app.guard.guard_model import GUARD_MODEL_DIR, TOKENIZER_FILE, GuardModel, in_window, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
HELDOUT = ROOT / "app" / "eval" / "data" / "guard_heldout.jsonl"
PAYLOADS = ("harmful_plain", "harmful_past_tense", "harmful_reframed", "injection", "extraction")
BENIGN = ("benign_instruction", "benign_technical", "bank_on_domain", "bank_alarming", "lookalike_homonym",
          "injection_lookalike")
PLACES = ("start", "middle", "end")
FILLER_WORDS = (20, 150)
SEED = 22


NOT_PROSE = re.compile(r"[{}<>=`]|http")
MARKUP_STARTS = ("#", "|", "```", "    ", "..", "*", "-", ">", "<", "[", "!", "=")


def prose_paragraphs(texts: list[str], min_words: int = 25) -> list[list[str]]:
    """The paragraphs of markdown / reST texts that are prose (no headings, lists, tables, code or links)."""
    out = []
    for text in texts:
        for block in text.split("\n\n"):
            words = block.split()
            if len(words) >= min_words and not block.lstrip().startswith(MARKUP_STARTS) and not NOT_PROSE.search(block):
                out.append(words)
    return out


def package_descriptions() -> list[str]:
    """The long descriptions of the installed distributions, by name (the lock file pins them)."""
    from importlib.metadata import distributions

    found = {(d.metadata["Name"] or "").lower(): d.read_text("METADATA") or "" for d in distributions()}
    return [found[name].split("\n\n", 1)[-1] for name in sorted(found)]


def hide(payload: str, prose: list[list[str]], place: str, rng: random.Random) -> str:
    words: list[str] = []
    while len(words) < FILLER_WORDS[1]:
        words += rng.choice(prose)
    n = rng.randint(*FILLER_WORDS)
    before = {"start": 0, "middle": n // 2, "end": n}[place]
    return " ".join(part for part in (" ".join(words[:before]), payload, " ".join(words[before:n])) if part)


def build_cases(seed: int = SEED) -> list[dict[str, Any]]:
    """Deterministic cases: {text, payload, category, place, prose, expected}."""
    rng = random.Random(seed)
    tokenizer = load_tokenizer(GUARD_MODEL_DIR / TOKENIZER_FILE)
    rows = [json.loads(line) for line in HELDOUT.read_text(encoding="utf-8").splitlines() if line]
    knowledge = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "knowledge").glob("*.md"))]
    proses = {"knowledge": prose_paragraphs(knowledge), "packages": prose_paragraphs(package_descriptions())}
    cases = []
    for row in rows:
        if row["category"] not in PAYLOADS + BENIGN:
            continue
        for prose_name, prose in proses.items():
            for place in PLACES:
                for _ in range(5):  # a few draws until the payload stays in the guard's window
                    text = hide(row["text"], prose, place, rng)
                    if in_window(tokenizer, text, row["text"]):
                        cases.append({"text": text, "payload": row["text"], "category": row["category"],
                                      "place": place, "prose": prose_name, "expected": row["expected"]})
                        break
    return cases


def score_cases(model: GuardModel, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Block rates per expected outcome x place x prose, and per category."""
    thresholds = model.thresholds
    scores = model.score_many([c["text"] for c in cases])
    table: dict[str, list[int]] = {}
    for case, s in zip(cases, scores, strict=True):
        blocked = s.unsafe >= thresholds.unsafe_block or s.attack >= thresholds.attack_block
        for key in (f"{case['expected']}", f"{case['expected']}/{case['place']}",
                    f"{case['expected']}/{case['prose']}", f"{case['expected']}/{case['category']}"):
            cell = table.setdefault(key, [0, 0])
            cell[0] += int(blocked)
            cell[1] += 1
    return {key: {"blocked": b, "n": n, "rate": round(b / n, 4)} for key, (b, n) in sorted(table.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=GUARD_MODEL_DIR)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = score_cases(GuardModel.load(args.model), build_cases())
    for key, cell in report.items():
        print(f"{key:40s} {cell['blocked']:4d}/{cell['n']:<4d} {100 * cell['rate']:5.1f}%")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
