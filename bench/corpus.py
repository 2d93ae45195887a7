"""A synthetic knowledge base of about N chunks, ingested with the project's real pipeline
(app.rag.ingest: chunking, MiniLM embeddings, FAISS + BM25) into a cached DATA_DIR.

The documents are the shipped knowledge/ files plus regional variants of their paragraphs, so the
benchmark questions retrieve relevant, realistic chunks. Variants repeat: with `vary_numbers=False`
(the pipeline corpus) there are only ~8 x 150 distinct chunk texts, and the build memoizes embeddings by
text, so a 10k-chunk index costs ~1.2k real MiniLM passes (minutes, not an hour, on a loaded 2-core box).
The FAISS benchmark measures ingestion speed on distinct texts (`vary_numbers=True`).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import CACHE_DIR, PROJECT_ROOT

REGIONS = ["Ohio", "Indiana", "Michigan", "Pennsylvania", "Kentucky", "Illinois", "West Virginia", "New York"]
SECTIONS_PER_DOC = 20  # each "## heading + paragraph" section is shorter than a chunk: one section = one chunk


def _paragraphs(knowledge_dir: Path) -> list[tuple[str, str]]:
    """(section heading, paragraph) pairs from the shipped knowledge base."""
    pairs: list[tuple[str, str]] = []
    for path in sorted(knowledge_dir.glob("*.md")):
        if path.stem.lower() == "readme":
            continue
        heading = path.stem.replace("-", " ")
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            block = block.strip()
            if block.startswith("#"):
                heading = block.lstrip("#").strip().splitlines()[0]
            elif len(block) > 80:
                pairs.append((heading, block))
    return pairs


def _vary(text: str, rng: random.Random) -> str:
    # Other amounts and counts, so variants are near-duplicates rather than exact ones.
    return re.sub(r"\d+", lambda m: str(max(1, int(m.group()) + rng.randint(-3, 9))), text)


class MemoEmbedder:
    """Embeds each distinct text once (the corpus repeats texts on purpose)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.memo: dict[str, Any] = {}

    def embed(self, texts: list[str]) -> Any:
        import numpy as np

        missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if missing:
            for text, vec in zip(missing, self.inner.embed(missing), strict=True):
                self.memo[text] = vec
        return np.stack([self.memo[t] for t in texts]).astype(np.float32)


def write_documents(target: Path, n_chunks: int, seed: int = 7, *, vary_numbers: bool = True) -> int:
    """Writes the shipped docs plus synthetic variants totalling about `n_chunks` chunks; returns files written."""
    rng = random.Random(seed)
    shipped = PROJECT_ROOT / "knowledge"
    target.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in shipped.glob("*.md"):
        if path.stem.lower() != "readme":
            shutil.copy(path, target / path.name)
            written += 1
    pairs = _paragraphs(shipped)
    remaining = max(0, n_chunks - len(pairs))  # the shipped docs chunk to about one chunk per paragraph
    doc_no = 0
    while remaining > 0:
        region = rng.choice(REGIONS)
        sections = min(SECTIONS_PER_DOC, remaining)
        suffix = f" {doc_no} (LX-{rng.randint(1000, 9999)})" if vary_numbers else ""
        title = f"Larkspur {region} service guide{suffix}"
        parts = [f"# {title}\n"]
        for _ in range(sections):
            heading, paragraph = rng.choice(pairs)
            text = _vary(paragraph, rng) if vary_numbers else paragraph
            parts.append(f"## {heading} in {region}\n\n{text}\n")
        (target / f"synthetic-{doc_no:05d}.md").write_text("\n".join(parts), encoding="utf-8")
        remaining -= sections
        doc_no += 1
        written += 1
    return written


def build_corpus(n_chunks: int = 10_000, *, cache_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Returns {"data_dir", "knowledge_dir", "chunks", "chunks_per_s", ...}; built once per size and cached."""
    from app.rag.embedder import get_embedder
    from app.rag.ingest import ingest
    from app.settings import Settings

    root = (cache_dir or CACHE_DIR) / f"corpus-{n_chunks}"
    info_path = root / "corpus.json"
    if info_path.exists():
        info: dict[str, Any] = json.loads(info_path.read_text())
        if (Path(info["data_dir"]) / "index" / "CURRENT").exists():
            return info
    shutil.rmtree(root, ignore_errors=True)
    knowledge_dir, data_dir = root / "knowledge", root / "data"
    files = write_documents(knowledge_dir, n_chunks, vary_numbers=False)
    settings = Settings(data_dir=data_dir, knowledge_dir=knowledge_dir)
    started = time.perf_counter()
    embedder = MemoEmbedder(get_embedder())
    report = ingest([knowledge_dir], settings, embedder=embedder, progress=progress)
    info = {
        "data_dir": str(data_dir),
        "knowledge_dir": str(knowledge_dir),
        "files": files,
        "chunks": report.total_chunks,
        "index_kind": report.index_kind,
        "embed_seconds": round(report.embed_seconds, 2),
        "ingest_seconds": round(time.perf_counter() - started, 2),
        "distinct_texts_embedded": len(embedder.memo),
    }
    info_path.write_text(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    import sys

    print(json.dumps(build_corpus(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000), indent=1))
