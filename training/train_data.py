"""The detector's training data: the public dev sets in ../shared/eval (minus the held-out slice of
app/eval/holdout.py) and our own rows in training/data/, as labelled `Item`s per report source.
Used by `guardchat guard train` (training/train.py)."""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.eval.holdout import HOLDOUT_SHARE, holdout_rows, is_holdout
from app.pipeline.conversation_intent import read_examples

TRAINING_DATA_DIR = Path(__file__).resolve().parent / "data"
SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")

# Do-Not-Answer mixes clear harm with borderline asks (advice, chatbot feelings, rumours). In these two
# risk areas only rows matching this pattern train the unsafe head; the rest are reported as "borderline".
BORDERLINE_DNA = {"dna:human_chatbox", "dna:misinformation_harms"}
CLEAR_HARM = re.compile(
    r"suicid|self-harm|harm myself|hurt myself|cut myself|burn myself|overdose|poison|starve|throw up|anorexi|"
    r"bulimi|eating disorder|laxative|low-calorie|end my (own )?life|until i die|bomb|hack|psychedelic|"
    r"mind-altering|pick a lock|identity documents|brake|appendectomy|dangerous stunt|superior|holocaust|"
    r"chinese always|ruin our country|exercise excessively|"
    # asking the chatbot for "its" identifiers is a privacy ask (a support bot must never play along)
    r"\byour (own )?(home address|phone number|social security|credit card|passport|driver's license|login|"
    r"password|mother's maiden|bank account|date of birth|health insurance|full name)",
    re.I,
)
# Llama Guard 3 categories by keyword (first match wins per category; a row may get several).
CATEGORY_KEYWORDS: dict[str, str] = {
    "S1": r"\bkill|murder|assassinat|assault|attack|violen|torture|kidnap|hurt|pain|shoot|stab|terroris|threat|weapon",
    "S2": r"hack|steal|stole|fraud|scam|launder|counterfeit|embezzl|malware|virus|botnet|phish|insider trading|"
    r"drug|illegal|theft|shoplift|evade|bypass|cheat|smuggl|blackmail|ransom|bribe|crack|fake id|forge|lock",
    "S3": r"traffick|prostitut|rape|sexual assault|molest|harass",
    "S4": r"child porn|minor|molest a child|underage|child sexual",
    "S5": r"defam|false accusation|reputation|fake review|libel|slander|fake news|misinformation",
    "S6": r"diagnos|prescri|medication|treat(ment)? (my|plan)|therap|dosage|invest|sue\b|legal steps|lawyer",
    "S7": r"personal information|private|address|phone number|date of birth|social security|account details|"
    r"driver's license|password|track .*location|co-worker|coworker|teammate|confidential|passport|dox|"
    r"credential|maiden name|insurance policy|your (credit card|bank account)",
    "S8": r"copyright|pirat|torrent|plagiari|trademark",
    "S9": r"bomb|explosive|chemical weapon|biological weapon|nuclear|nerve agent|anthrax|bioweapon|poison gas",
    "S10": r"\brace\b|racis|stereotyp|inferior|hate speech|muslim|jew|black people|immigrant|gay|religio|"
    r"discriminat|superior|all \w+ people",
    "S11": r"suicid|self-harm|harm myself|cut myself|anorexi|bulimi|eating disorder|starve|overdose|end my (own )?life",
    "S12": r"porn|sexual|explicit|erotic|nude|dirty joke|sex\b",
    "S13": r"election|voting|ballot|voter|political candidate",
    "S14": r"execute|shell|os\.system|reverse shell|fork bomb|sandbox|exfiltrat",
}
FALLBACK_CATEGORY = {
    "dna:discrimination_exclusion_toxicity_hateful_offensive": "S10",
    "dna:information_hazard": "S7",
    "dna:malicious_uses": "S2",
    "dna:misinformation_harms": "S5",
    "dna:human_chatbox": "S11",
}


@dataclass
class Item:
    """One text to score. Heads ignore labels that are None; `source` keys the report rows."""

    text: str
    source: str
    unsafe: int | None
    attack: int | None
    topic: str | None = None
    categories: list[str] = field(default_factory=list)
    group: str = ""  # where a harmful row comes from (a dataset's category, or our file): the CV report's rows
    payload: str | None = None  # for wrapped templates: only windows holding it train the unsafe head
    slot_text: str | None = None  # for templates: the text with its {{ prompt }} slot


def llama_guard_categories(text: str, dataset_category: str = "") -> list[str]:
    found = [c for c, pattern in CATEGORY_KEYWORDS.items() if re.search(pattern, text, re.I)]
    return found or [FALLBACK_CATEGORY.get(dataset_category, "S2")]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_sources(eval_dir: Path, rng: random.Random, max_per_source: int | None) -> dict[str, list[Item]]:
    """Bare items per report source (wrapped templates are built later, per fold)."""
    def cap(rows: list[Any]) -> list[Any]:
        return rng.sample(rows, max_per_source) if max_per_source and len(rows) > max_per_source else rows

    src: dict[str, list[Item]] = {k: [] for k in ("harmful", "borderline", "template", "injection", "chitchat",
                                                  "unanswerable", "passage", "on_domain", "alarming", "lookalike",
                                                  "general", "advice", "off_topic", "our_attack")}
    def dev(name: str) -> list[dict[str, Any]]:  # the training side of the explicit split (app/eval/holdout.py)
        return [r for r in _jsonl(eval_dir / name) if not is_holdout(name, r["text"])]

    for row in dev("harmful_dev.jsonl"):
        cat, text = row.get("category", ""), row["text"]
        # Harmful and borderline asks are no bank support either: the topic head learns them as off_topic, so
        # the topic rail also refuses those that borrow bank words ("your bank account", "insider trading").
        if cat in BORDERLINE_DNA and not CLEAR_HARM.search(text):
            src["borderline"].append(Item(text, "borderline", None, 0, "off_topic"))
        else:
            src["harmful"].append(Item(text, "harmful", 1, 0, "off_topic",
                                       categories=llama_guard_categories(text, cat), group=cat))
    for row in dev("jailbreak_templates_dev.jsonl"):
        src["template"].append(Item(SLOT.sub("", row["text"]), "template", None, 1, slot_text=row["text"]))
    src["injection"] = [Item(r["text"], "injection", 0, 1) for r in dev("injection_dev.jsonl")]
    src["chitchat"] = [Item(t, "chitchat", 0, 0, "off_topic") for t in
                       dict.fromkeys(r["text"] for r in dev("benign_dev.jsonl"))]
    unans = _jsonl(eval_dir / "unanswerable_dev.jsonl")
    src["unanswerable"] = [Item(r["question"], "unanswerable", 0, 0, "off_topic") for r in unans]
    # The passages are benign prose of many kinds: the detector also scores retrieved chunks and answers.
    src["passage"] = [Item(t, "passage", 0, 0) for t in dict.fromkeys(r["context"] for r in unans)]
    for path in sorted(TRAINING_DATA_DIR.glob("*.jsonl")):
        for row in _jsonl(path):
            kind, label = row.get("kind", ""), row["label"]
            if label == "harmful":
                src["harmful"].append(Item(row["text"], "harmful", 1, 0, "off_topic", categories=row["llama_guard"],
                                           group=path.stem))
            elif label == "attack":
                src["our_attack"].append(Item(row["text"], "our_attack", None, 1))
            else:
                source = kind if kind in OWN_BENIGN_KINDS else "general"
                src.setdefault(source, []).append(Item(row["text"], source, 0, 0, row.get("topic")))
    # Requests about the conversation itself ("what was the last thing you told me", "tl;dr pls"), written for the
    # turn's nearest-example test (app/pipeline/conversation_intent.py): benign and on-domain here too. Without them
    # the attack head read such recall questions as system-prompt extraction.
    src["conversation"] = src.get("conversation", []) + [
        Item(str(row["text"]), "conversation", 0, 0, "on_domain") for row in read_examples()
        if row["about_conversation"]
    ]
    return {k: cap(v) for k, v in src.items()}


def heldout_texts(eval_dir: Path) -> list[str]:
    """The held-out dev rows as the detector's training would see them (templates without their slot)."""
    return [SLOT.sub("", r["text"]) for name in HOLDOUT_SHARE for r in holdout_rows(eval_dir, name)]


# Kinds of our own benign rows (training/data/*.jsonl `kind`) that are their own report source; others: "general".
OWN_BENIGN_KINDS = ("on_domain", "alarming", "lookalike", "advice", "off_topic", "injection_lookalike", "instruction",
                    "technical", "conversation", "fees_deadlines", "answer_opening")
BENIGN_SOURCES = (
    "chitchat", "unanswerable", "passage", "answer_fragment", "general", "borderline", *OWN_BENIGN_KINDS,
)  # fmt: skip
UNSAFE_SOURCES = ("harmful", "wrapped")
ATTACK_SOURCES = ("template", "wrapped", "injection", "our_attack")
ON_DOMAIN_SOURCES = ("on_domain", "alarming", "lookalike", "conversation", "fees_deadlines")
