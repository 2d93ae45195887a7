from __future__ import annotations

import numpy as np
from rank_bm25 import BM25Okapi

from app.rag.bm25 import Bm25Matrix, tokenize

TEXTS = [
    "Outgoing domestic wires cost $25 and must be sent before 4 pm.",
    "International wires cost $45 and arrive in 1 to 3 business days.",
    "Error code QX-7731 means the check scanner could not read the routing number.",
    "Lock your debit card in the app; recurring payments keep working.",
    "The the the wires wires",
]


def test_sparse_scores_equal_rank_bm25() -> None:
    matrix = Bm25Matrix.build(TEXTS)
    reference = BM25Okapi([tokenize(t) for t in TEXTS], k1=1.5, b=0.75, epsilon=0.25)
    for query in ["domestic wire cost", "wires wires cost", "qx-7731 error", "nothing matches zzz", "the card"]:
        expected = reference.get_scores(tokenize(query))
        np.testing.assert_allclose(matrix.scores(query), expected, rtol=1e-5, atol=1e-6)


def test_top_ranks_exact_code_first_and_skips_zero_scores() -> None:
    matrix = Bm25Matrix.build(TEXTS)
    top = matrix.top("What does QX-7731 mean?", 3)
    assert top[0][0] == 2
    assert all(score > 0 for _, score in top)
    assert matrix.top("zzz unknown words", 3) == []


def test_save_load_roundtrip(tmp_path) -> None:
    matrix = Bm25Matrix.build(TEXTS)
    matrix.save(tmp_path)
    loaded = Bm25Matrix.load(tmp_path)
    np.testing.assert_allclose(loaded.scores("international wires"), matrix.scores("international wires"))
