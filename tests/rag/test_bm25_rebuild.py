"""An index written with an older BM25 tokenizer must not be queried with the new one: load rebuilds the matrix
from the docstore, and the next ingest stores it even when no document changed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from rank_bm25 import BM25Okapi
from scipy import sparse

from app.rag.bm25 import EPSILON, K1, TOKENIZER_VERSION, B, Bm25Matrix
from app.rag.chunking import search_text
from app.rag.embedder import MiniLMEmbedder
from app.rag.index import VERSIONS_DIR, current_version, load_snapshot
from app.rag.ingest import index_is_current, ingest
from app.rag.retrieve import HybridRetriever
from tests.rag.conftest import make_settings, write_corpus


def _tokenize_v1(text: str) -> list[str]:
    """The tokenizer before versioning: lowercase words and compounds, no stoplist, no stemming."""
    lowered = text.lower()
    return re.findall(r"\w+", lowered) + re.findall(r"\w+(?:[-/.]\w+)+", lowered)


def _downgrade_to_v1(directory: Path) -> None:
    """Rewrites a version's BM25 files and manifest as an ingest from before TOKENIZER_VERSION wrote them."""
    with (directory / "chunks.jsonl").open(encoding="utf-8") as fh:
        chunks = [json.loads(line) for line in fh if line.strip()]
    okapi = BM25Okapi([_tokenize_v1(search_text(c)) for c in chunks], k1=K1, b=B, epsilon=EPSILON)
    vocabulary: dict[str, int] = {}
    rows, cols, vals = [], [], []
    for doc, freqs in enumerate(okapi.doc_freqs):
        for term, tf in freqs.items():
            rows.append(doc)
            cols.append(vocabulary.setdefault(term, len(vocabulary)))
            vals.append(okapi.idf[term] * tf)
    Bm25Matrix(sparse.csc_matrix((vals, (rows, cols)), shape=(len(chunks), len(vocabulary))), vocabulary).save(
        directory
    )
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    manifest.pop("bm25_tokenizer")
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def test_stale_bm25_is_rebuilt_on_load_and_stored_by_the_next_ingest(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    settings = make_settings(tmp_path)
    paths = write_corpus(settings.knowledge_dir)
    ingest(paths, settings, embedder=embedder, progress=False)
    version = current_version(settings.index_dir)
    assert version is not None
    directory = settings.index_dir / VERSIONS_DIR / version
    assert json.loads((directory / "manifest.json").read_text())["bm25_tokenizer"] == TOKENIZER_VERSION
    fresh = load_snapshot(settings.index_dir)
    assert not fresh.bm25_rebuilt and index_is_current(settings)

    _downgrade_to_v1(directory)
    assert "withdrawals" in Bm25Matrix.load(directory).vocabulary  # really the old tokens on disk
    stale = load_snapshot(settings.index_dir)
    assert stale.bm25_rebuilt and stale.version == version
    assert not index_is_current(settings)  # so `guardchat ingest --if-missing` (make run) ingests to store it
    assert "withdrawals" not in stale.bm25.vocabulary and "withdraw" in stale.bm25.vocabulary
    np.testing.assert_allclose(stale.bm25.scores("free withdrawals"), fresh.bm25.scores("free withdrawals"))
    # A running retriever on the stale version already matches the new query tokens.
    question = "how many savings withdrawals are free"
    keyword = HybridRetriever(settings).keyword_search(question, 1)
    assert keyword and keyword[0].document_id == "savings"

    report = ingest(paths, settings, embedder=embedder, progress=False)  # no file changed
    assert report.changed and report.chunks_added == 0 and report.version != version
    stored = load_snapshot(settings.index_dir)
    assert not stored.bm25_rebuilt and "withdraw" in stored.bm25.vocabulary and index_is_current(settings)
    assert [c["id"] for c in stored.chunks] == [c["id"] for c in fresh.chunks]
    np.testing.assert_array_equal(np.asarray(stored.embeddings), np.asarray(fresh.embeddings))
    # ...and once stored, an unchanged ingest writes nothing.
    assert not ingest(paths, settings, embedder=embedder, progress=False).changed
