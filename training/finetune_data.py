"""The fine-tuned guard's training rows: one JSONL file that a CPU or a GPU machine trains from.

Sources (training/train_data.py `load_sources`): the public dev sets in ../shared/eval minus their held-out
slice (app/eval/holdout.py), our own rows in training/data/, and paragraphs of the shipped knowledge
base (benign answer-like text: the guard also scores answer windows). Rows within cosine NEAR_DUPLICATE (MiniLM)
of any evaluation row — the public held-out slice, app/eval/data/guard_heldout.jsonl, guard_lookalike_probe.jsonl,
guard_bank_probe.jsonl, guard_sensitive_probe.jsonl, topic_dev.jsonl, and tests/data/conversation_intent.jsonl
(`OTHER_MEASURES`) — are dropped, so the evaluation never scores a paraphrase of a training row.

Jailbreak templates train twice: bare (attack) and wrapped around harmful requests of the same split (attack
and unsafe). Short rows are also hidden in benign prose (`embedded`), labelled as the short text. A tenth of the
rows, chosen by a hash of the text, is the validation split that calibration and thresholds are fitted on.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from app.guard.guard_model import TOPIC_LABELS
from training.train_data import SLOT, Item, heldout_texts, load_sources

ROOT = Path(__file__).resolve().parents[1]
EVAL_DATA = ROOT / "app" / "eval" / "data"
EVAL_FILES = tuple(EVAL_DATA / name for name in (
    "guard_heldout.jsonl", "guard_lookalike_probe.jsonl", "guard_bank_probe.jsonl", "guard_sensitive_probe.jsonl",
    "topic_dev.jsonl"))
# Other sets that measure what the guard's rows feed (not guard probes): training keeps away from them too.
OTHER_MEASURES = (ROOT / "tests" / "data" / "conversation_intent.jsonl",)
KNOWLEDGE_DIR = ROOT / "knowledge"
NEAR_DUPLICATE = 0.9
VAL_SHARE = 0.1
WRAPS_PER_TEMPLATE = 3


def split_of(text: str) -> str:
    digest = hashlib.sha256(f"guard-val-v1\0{text.strip().lower()}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < VAL_SHARE else "train"


def knowledge_paragraphs(directory: Path = KNOWLEDGE_DIR, min_chars: int = 120) -> list[str]:
    """Paragraphs of the knowledge base (answers quote them: benign, on-domain prose)."""
    out: list[str] = []
    for path in sorted(directory.glob("*.md")):
        for block in path.read_text(encoding="utf-8").split("\n\n"):
            text = " ".join(block.split())
            if len(text) >= min_chars and not text.startswith("#"):
                out.append(text)
    return out


FRAGMENT_SEED = 20261206
FRAGMENT_WORDS = (2, 24)  # the first output windows: 1 delta, then 40, 80, ... characters (app/pipeline/streaming.py)


def answer_fragments(paragraphs: list[str], seed: int = FRAGMENT_SEED) -> list[str]:
    """Benign text cut mid-sentence, as the output rail sees an answer's first windows: a paragraph's first words and
    one sentence's first words (markdown marks dropped). Without them the guard read "To turn on Face ID, open the
    Larkspur Bank" as unsafe (0.91): it had only seen whole requests and whole paragraphs."""
    rng = random.Random(seed)  # its own: the other sources' sampling stays as it was
    out: list[str] = []
    for paragraph in paragraphs:
        plain = paragraph.replace("**", "").replace("`", "").lstrip("- ")
        sentences = [s for s in plain.replace("! ", ". ").replace("? ", ". ").split(". ") if len(s.split()) > 3]
        for text in [plain, rng.choice(sentences)] if sentences else [plain]:
            words = text.split()
            out.append(" ".join(words[: rng.randint(*FRAGMENT_WORDS)]))
    return list(dict.fromkeys(out))


def evaluation_texts(eval_dir: Path) -> list[str]:
    texts = heldout_texts(eval_dir)
    for path in EVAL_FILES + OTHER_MEASURES:
        if path.exists():
            texts += [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").split("\n") if line]
    return texts


def far_from(embedder: Any, texts: list[str], avoid: list[str]) -> np.ndarray:
    """Mask of `texts` not within cosine NEAR_DUPLICATE (MiniLM) of any text in `avoid`."""
    if not avoid:
        return np.ones(len(texts), dtype=bool)
    vectors = embedder.embed(texts + avoid)
    return np.asarray((vectors[: len(texts)] @ vectors[len(texts) :].T).max(axis=1) < NEAR_DUPLICATE)


def _row(it: Item, split: str) -> dict[str, Any]:
    return {"text": it.text, "source": it.source, "unsafe": it.unsafe, "attack": it.attack,
            "topic": TOPIC_LABELS.index(it.topic) if it.topic else None, "cats": it.categories, "split": split,
            "origin": it.group or it.source}


def wrap(templates: list[Item], harmful: list[Item], rng: random.Random) -> list[Item]:
    out = []
    for template in templates:
        if template.slot_text is None or not SLOT.search(template.slot_text):
            continue
        for request in rng.sample(harmful, min(WRAPS_PER_TEMPLATE, len(harmful))):
            text = request.text.join(SLOT.split(template.slot_text))
            out.append(Item(text, "wrapped", 1, 1, categories=request.categories, payload=request.text))
    return out


EMBED_SEED = 20261208
# How many short texts of each kind are hidden in benign prose (training side and validation side alike, each
# keeping its text's split): requests, attacks and, as many, benign texts in the same prose, so "long" is no cue.
EMBEDDED = {
    "embedded_harmful": (("harmful",), 1200),
    "embedded_attack": (("our_attack", "injection"), 700),
    "embedded_benign": (("lookalike", "injection_lookalike", "alarming", "on_domain", "instruction", "technical",
                         "chitchat", "fees_deadlines"), 1500),
}
EMBED_LEADS = ("", "", "", "Here is something I'm working on. ", "Please read this and reply: ", "From my notes: ",
               "Can you proofread this? ", "Summarize the following text. ", "A message I got: ")
EMBED_FILLER_WORDS = (20, 150)


def embedded(sources: dict[str, list[Item]], prose: list[str], seed: int = EMBED_SEED) -> list[Item]:
    """Short texts hidden at the start, middle or end of benign prose, labelled as the short text is: hidden in
    knowledge-base prose, the session-19 guard blocked 28% of held-out harmful requests, injections and extractions
    (app/eval/hidden_payload.py). Only rows whose short text stays inside the window the guard reads (its head and
    tail tokens) are kept."""
    from app.guard.guard_model import GUARD_MODEL_DIR, TOKENIZER_FILE, in_window, load_tokenizer

    rng = random.Random(seed)
    tokenizer = load_tokenizer(GUARD_MODEL_DIR / TOKENIZER_FILE)
    words = [paragraph.split() for paragraph in prose]
    out: list[Item] = []
    for source, (kinds, count) in EMBEDDED.items():
        pool = [it for kind in kinds for it in sources.get(kind, [])]
        for inner in rng.sample(pool, min(count, len(pool))):
            filler = rng.choice(words)
            while len(filler) < EMBED_FILLER_WORDS[1]:
                filler = filler + rng.choice(words)
            n = rng.randint(*EMBED_FILLER_WORDS)
            before = rng.choice((0, n // 2, n))
            text = " ".join([rng.choice(EMBED_LEADS) + " ".join(filler[:before]), inner.text,
                             " ".join(filler[before:n])]).strip()
            if not in_window(tokenizer, text, inner.text):
                continue  # the guard would not see it: no label to learn
            out.append(Item(text, source, inner.unsafe, inner.attack, categories=inner.categories,
                            group=inner.group or inner.source, payload=inner.text))
    return out


def build_rows(eval_dir: Path, embedder: Any, seed: int = 1234) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All training rows (train and val split) and a summary (counts, dropped near-duplicates)."""
    rng = random.Random(seed)
    sources = load_sources(Path(eval_dir), rng, None)
    paragraphs = knowledge_paragraphs()
    sources["kb_passage"] = [Item(t, "kb_passage", 0, 0) for t in paragraphs]
    prose = paragraphs + [it.text for it in sources.get("passage", [])]
    sources["answer_fragment"] = [Item(t, "answer_fragment", 0, 0) for t in answer_fragments(prose)]
    bare = [it for name in sorted(sources) for it in sources[name]]
    held = evaluation_texts(Path(eval_dir))
    keep = far_from(embedder, [it.text for it in bare], held)
    dropped: dict[str, int] = {}
    for it, k in zip(bare, keep, strict=True):
        if not k:
            dropped[it.source] = dropped.get(it.source, 0) + 1
    bare = [it for it, k in zip(bare, keep, strict=True) if k]
    split = {id(it): split_of(it.text) for it in bare}
    rows = [_row(it, split[id(it)]) for it in bare]
    for side in ("train", "val"):
        templates = [it for it in bare if it.source == "template" and split[id(it)] == side]
        harmful = [it for it in bare if it.source == "harmful" and split[id(it)] == side]
        rows += [_row(it, side) for it in wrap(templates, harmful, rng)]
    # Each hidden text keeps its own split, so no validation text trains inside prose.
    by_text = {it.text: split[id(it)] for it in bare}
    hosted = {name: [it for it in items if it.text in by_text] for name, items in sources.items()}
    rows += [_row(it, by_text[it.payload or ""]) for it in embedded(hosted, prose)]
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(row["source"], {"train": 0, "val": 0})[row["split"]] += 1
    return rows, {"counts": counts, "near_duplicates_dropped": dropped, "evaluation_rows": len(held)}


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line]


def file_hashes(eval_dir: Path) -> dict[str, str]:
    """sha256 (16 hex) of every data file a training run reads."""
    from app.pipeline.conversation_intent import EXAMPLES
    from training.train_data import TRAINING_DATA_DIR, file_hash

    files = sorted(Path(eval_dir).glob("*.jsonl")) + sorted(TRAINING_DATA_DIR.glob("*.jsonl")) + [EXAMPLES]
    return {p.name: file_hash(p) for p in files}
