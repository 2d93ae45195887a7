from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from app.rag.bm25 import Bm25Matrix
from app.rag.embedder import MiniLMEmbedder
from app.rag.index import CURRENT_FILE, VERSIONS_DIR, current_version, load_snapshot, measure_recall
from app.rag.ingest import ingest
from app.rag.retrieve import HybridRetriever
from app.settings import Settings
from tests.rag.conftest import make_pdf, write_corpus


def _search(settings: Settings, embedder: MiniLMEmbedder, query: str, k: int = 4):
    retriever = HybridRetriever(settings)
    chunks, _ = retriever.search(query, embedder.embed([query])[0], k)
    return chunks


def _assert_consistent(settings: Settings) -> None:
    snap = load_snapshot(settings.index_dir)
    assert len(snap.chunks) == snap.embeddings.shape[0] == snap.index.ntotal == snap.bm25.n_docs
    per_doc = {doc_id: entry["chunks"] for doc_id, entry in snap.documents.items()}
    counted: dict[str, int] = {}
    for chunk in snap.chunks:
        counted[chunk["document_id"]] = counted.get(chunk["document_id"], 0) + 1
    assert counted == per_doc


def test_ingest_search_reingest_change_delete(rag_settings: Settings, embedder: MiniLMEmbedder) -> None:
    kb = rag_settings.knowledge_dir
    paths = write_corpus(kb)
    report = ingest(paths, rag_settings, embedder=embedder, progress=False)
    assert [f.status for f in report.files] == ["added"] * 4
    assert report.total_documents == 4 and report.total_chunks == report.chunks_added > 4
    assert report.chunks_per_s > 0 and report.index_kind == "flat"
    _assert_consistent(rag_settings)

    top = _search(rag_settings, embedder, "How much does it cost to send a domestic wire?")[0]
    assert (top.document_id, top.source, top.title, top.section) == (
        "wires",
        "wires.md",
        "Wire transfers",
        "Domestic wires",
    )
    assert top.id.startswith("wires#") and top.page is None and "$25" in top.content
    assert top.score >= rag_settings.rag_score_threshold

    # Unchanged files are skipped and no new version is written.
    again = ingest(paths, rag_settings, embedder=embedder, progress=False)
    assert [f.status for f in again.files] == ["skipped"] * 4
    assert again.version == report.version and not again.changed

    # A changed file has its chunks replaced: the new fact is found, the old one is gone.
    old_ids = {c["id"] for c in load_snapshot(rag_settings.index_dir).chunks if "$25 each" in c["content"]}
    assert old_ids
    (kb / "wires.md").write_text((kb / "wires.md").read_text().replace("$25 each", "$31 each"))
    changed = ingest(paths, rag_settings, embedder=embedder, progress=False)
    assert {f.document_id: f.status for f in changed.files}["wires"] == "updated"
    assert [f.status for f in changed.files].count("skipped") == 3
    snap = load_snapshot(rag_settings.index_dir)
    assert not old_ids & {c["id"] for c in snap.chunks}
    assert not any("$25 each" in c["content"] for c in snap.chunks)
    assert "$31 each" in _search(rag_settings, embedder, "domestic wire transfer fee")[0].content
    _assert_consistent(rag_settings)

    # Delete by path, then search no longer returns the document.
    deleted = ingest([], rag_settings, embedder=embedder, delete=[kb / "wires.md"], progress=False)
    assert [(f.document_id, f.status) for f in deleted.files] == [("wires", "deleted")]
    assert "wires" not in load_snapshot(rag_settings.index_dir).documents
    assert all(c.document_id != "wires" for c in _search(rag_settings, embedder, "domestic wire transfer fee", 8))
    _assert_consistent(rag_settings)
    unknown = ingest([], rag_settings, embedder=embedder, delete_ids=["nope"], progress=False)
    assert unknown.files[0].status == "error" and unknown.files[0].code == "unknown"
    # Only the live version and the previous one are kept on disk.
    assert len([p for p in (rag_settings.index_dir / VERSIONS_DIR).iterdir()]) == 2


def test_directory_ingest_prunes_removed_files(rag_settings: Settings, embedder: MiniLMEmbedder) -> None:
    kb = rag_settings.knowledge_dir
    write_corpus(kb, {"a.md": "# Alpha\nAlpha accounts pay 2% interest.", "b.md": "# Beta\nBeta cards are blue."})
    (kb / "README.md").write_text("# About this folder\nNot knowledge.")
    first = ingest([kb], rag_settings, embedder=embedder, progress=False)
    assert sorted(f.document_id for f in first.files) == ["a", "b"]
    (kb / "b.md").unlink()
    second = ingest([kb], rag_settings, embedder=embedder, progress=False)
    assert {f.document_id: f.status for f in second.files} == {"a": "skipped", "b": "deleted"}


def test_bad_files_are_reported_and_the_rest_is_ingested(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    from tests.rag.conftest import make_settings

    settings = make_settings(tmp_path).model_copy(update={"ingest_max_file_bytes": 4000})
    kb = settings.knowledge_dir
    good = write_corpus(kb, {"good.md": "# Good\nThe good document says savings earn 3.10% APY."})
    (kb / "rates.pdf").write_bytes(make_pdf(["Certificates of deposit earn 4.2% APY for 12 months."]))
    (kb / "corrupt.pdf").write_bytes(b"%PDF-1.7\n" + os.urandom(300))
    (kb / "junk.txt").write_bytes(os.urandom(500).replace(b"\x00", b"\x01") + b"\x00")
    (kb / "empty.md").write_bytes(b"")
    (kb / "slides.pptx").write_bytes(b"PK\x03\x04")
    (kb / "huge.txt").write_text("lorem ipsum " * 1000)
    paths = [*good, *(kb / n for n in ("rates.pdf", "corrupt.pdf", "junk.txt", "empty.md", "slides.pptx", "huge.txt"))]
    report = ingest(paths, settings, embedder=embedder, progress=False)
    by_id = {f.document_id: f for f in report.files}
    assert by_id["good"].status == by_id["rates"].status == "added"
    assert {k: by_id[k].code for k in ("corrupt", "junk", "empty", "slides", "huge")} == {
        "corrupt": "corrupt",
        "junk": "binary",
        "empty": "empty",
        "slides": "unsupported_type",
        "huge": "too_large",
    }
    assert all(by_id[k].message for k in ("corrupt", "junk", "empty", "slides", "huge"))
    assert sorted(load_snapshot(settings.index_dir).documents) == ["good", "rates"]
    pdf_chunk = _search(settings, embedder, "CD certificate of deposit rate")[0]
    assert (pdf_chunk.document_id, pdf_chunk.page) == ("rates", 1)


class ExplodingEmbedder:
    """The real embedder, failing after `fail_after` calls: an ingest dying in the middle."""

    def __init__(self, inner: MiniLMEmbedder, fail_after: int) -> None:
        self.inner, self.dim, self.calls, self.fail_after = inner, inner.dim, 0, fail_after

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if self.calls > self.fail_after:
            raise KeyboardInterrupt  # what Ctrl-C looks like mid-ingest
        return self.inner.embed(texts)


def test_interrupted_ingest_keeps_the_previous_index(
    rag_settings: Settings, embedder: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    kb = rag_settings.knowledge_dir
    paths = write_corpus(kb)
    ingest(paths, rag_settings, embedder=embedder, progress=False)
    before = load_snapshot(rag_settings.index_dir)
    (kb / "wires.md").write_text("# Wire transfers\nWires are no longer offered.")
    (kb / "new.md").write_text("# New\nA new document.")

    with pytest.raises(KeyboardInterrupt):
        ingest([*paths, kb / "new.md"], rag_settings, embedder=ExplodingEmbedder(embedder, 0), progress=False)
    # A crash while writing the new version: the half-written temp dir is removed, CURRENT untouched.
    monkeypatch.setattr(Bm25Matrix, "save", lambda self, d: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ingest([*paths, kb / "new.md"], rag_settings, embedder=embedder, progress=False)
    monkeypatch.undo()

    after = load_snapshot(rag_settings.index_dir)
    assert after.version == before.version and after.chunks == before.chunks
    assert not list((rag_settings.index_dir / VERSIONS_DIR).glob(".tmp-*"))
    _assert_consistent(rag_settings)
    # The next ingest works (the lock was released) and applies the change.
    report = ingest([*paths, kb / "new.md"], rag_settings, embedder=embedder, progress=False)
    assert {f.document_id: f.status for f in report.files}["new"] == "added"
    assert "no longer offered" in _search(rag_settings, embedder, "wire transfers offered")[0].content


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from app.rag.embedder import get_embedder
from app.rag.ingest import ingest
from tests.rag.conftest import make_settings

settings = make_settings(Path(sys.argv[1]))
inner = get_embedder()

class Slow:
    dim = inner.dim
    def embed(self, texts):
        vectors = inner.embed(texts)
        Path(sys.argv[2]).write_text("embedding")
        time.sleep(60)
        return vectors

ingest([Path(p) for p in sys.argv[3:]], settings, embedder=Slow(), progress=False)
"""


def test_killed_ingest_process_leaves_index_loadable(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    from tests.rag.conftest import make_settings

    settings = make_settings(tmp_path)
    paths = write_corpus(settings.knowledge_dir)
    ingest(paths[:2], settings, embedder=embedder, progress=False)
    before = load_snapshot(settings.index_dir)
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tmp_path), str(marker), *map(str, paths)],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the ingest subprocess never reached the embedding step"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    after = load_snapshot(settings.index_dir)
    assert after.version == before.version == current_version(settings.index_dir)
    assert after.chunks == before.chunks
    report = ingest(paths, settings, embedder=embedder, progress=False)  # lock released by the kernel
    assert sorted(f.status for f in report.files) == ["added", "added", "skipped", "skipped"]
    assert (
        json.loads((settings.index_dir / VERSIONS_DIR / report.version / "manifest.json").read_text())["count"]
        == report.total_chunks
    )
    assert (settings.index_dir / CURRENT_FILE).read_text() == report.version


def test_hnsw_above_threshold_and_recall(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    from tests.rag.conftest import make_settings

    settings = make_settings(tmp_path).model_copy(update={"rag_exact_max_vectors": 3})
    report = ingest(write_corpus(settings.knowledge_dir), settings, embedder=embedder, progress=False)
    assert report.index_kind == "hnsw"
    assert _search(settings, embedder, "domestic wire cost")[0].document_id == "wires"

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    from app.rag.index import build_faiss_index

    index = build_faiss_index(vectors, exact_max=1000)
    index.hnsw.efSearch = 64
    recall = measure_recall(index, vectors, vectors[:100] + 0.01, k=10)
    assert 0.8 <= recall <= 1.0
    assert measure_recall(build_faiss_index(vectors, exact_max=10_000), vectors, vectors[:20], k=10) == 1.0
