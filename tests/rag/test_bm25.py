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


def test_tokenize_drops_function_words_stems_and_keeps_codes_verbatim() -> None:
    assert tokenize("Why does my card say these checks were signed?") == ["card", "say", "check", "sign"]
    tokens = tokenize("What does LX-4471 mean for Transfers")
    assert tokens[-1] == "lx-4471"  # the code as one unstemmed token, after its parts
    assert {"lx", "4471", "mean", "transfer"} <= set(tokens) and "what" not in tokens and "does" not in tokens


def test_question_wording_does_not_outweigh_the_content_word() -> None:
    # Help pages speak to "you"; customers ask "how much does my ...". Before the stoplist, "does" and "my"
    # (rare in help text, hence a high idf) pulled the chatty page above the one about wires.
    texts = [
        "Outgoing wires cost $25 each.",
        "Why does my statement look different? It does not matter where my account was opened.",
        "Savings accounts pay interest monthly.",
        "Cards can be locked in the app.",
    ]
    matrix = Bm25Matrix.build(texts)
    assert matrix.top("how much does my wire cost", 1)[0][0] == 0


def test_inflected_forms_match() -> None:
    matrix = Bm25Matrix.build(["Sign the back of each check before you deposit it.", *TEXTS[:4]])
    assert matrix.top("someone signed my checks", 1)[0][0] == 0
    assert matrix.top("deposited", 1)[0][0] == 0


def test_coverage_is_the_share_of_query_idf_a_chunk_holds() -> None:
    matrix = Bm25Matrix.build(TEXTS)
    assert matrix.coverage("international wires", 1) == 1.0
    partial = matrix.coverage("international wires", 0)  # "wires" only: the rarer "international" is missing
    assert 0.0 < partial < 0.5
    # A word the corpus never uses weighs more than any known word, so it pulls coverage down hardest.
    assert matrix.coverage("international zeppelin", 1) < 0.5 < matrix.coverage("international wires", 1)
    assert matrix.coverage("the what", 1) == 0.0 and matrix.coverage("wires", 99) == 0.0
