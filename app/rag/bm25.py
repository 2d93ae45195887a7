"""BM25 (Okapi) as a precomputed sparse matrix, so a query is a column slice and a sum.

rank-bm25's `get_scores` loops over every document in Python for every query term (tens of ms at
100k chunks). We use rank-bm25 at ingest time for its exact Okapi statistics (idf with the
epsilon floor, average length) and freeze the per-(chunk, term) weights into a CSC matrix:

    w[d, t] = idf[t] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len[d] / avgdl))

Scores are then identical to `BM25Okapi.get_scores` (tests check this) and a query costs
well under a millisecond at 100k chunks.

Tokens (`tokenize`, version `TOKENIZER_VERSION`): lowercase words minus English function words, stemmed
with Snowball English ("signed checks" ~ "sign check"), plus hyphenated codes verbatim. Why the stoplist:
documentation is written in the second person, so the words of customers' questions ("my", "does", "why")
are rare in it and got the highest idf of all. An index built with another tokenizer version must be
rebuilt (app/rag/index.py does it on load, app/rag/ingest.py persists it).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import snowballstemmer
from scipy import sparse

K1 = 1.5
B = 0.75
EPSILON = 0.25

# Bump whenever `tokenize` changes: stored matrices hold the old tokens and are rebuilt (app/rag/index.py).
# 1: lowercase words + compounds. 2: + stoplist and Snowball stemming.
TOKENIZER_VERSION = 2

_WORD = re.compile(r"\w+")
_COMPOUND = re.compile(r"\w+(?:[-/.]\w+)+")
# Function words only: pronouns, auxiliaries, articles, prepositions, question words and contraction
# leftovers ("don't" -> "don", "t"). Not a general stoplist (sklearn's drops "bill", "call", "back",
# "amount", which are content words in a bank's help pages).
_STOPWORD_TEXT = """
a about above after again against am an and any are as at be because been before being below between
both but by can could d did do does doing don down during each few for from further had has have having
he her here hers herself him himself his how i if in into is it its itself just ll m me mine my myself
now o of off on once only or other our ours ourselves out over own re s same she should so some such t
than that the their theirs them themselves then there these they this those through to too under until
up ve very was we were what when where which while who whom why will with would y you your yours
yourself yourselves
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_stemmers = threading.local()  # snowballstemmer objects keep per-call state: one per thread


@lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    stemmer = getattr(_stemmers, "english", None)
    if stemmer is None:
        stemmer = _stemmers.english = snowballstemmer.stemmer("english")
    stem: str = stemmer.stemWord(word)
    return stem


def tokenize(text: str) -> list[str]:
    """Stemmed lowercase words without function words; hyphenated codes ("LX-4471") also count as one
    unstemmed token, so an exact code match outweighs matching its parts separately."""
    lowered = text.lower()
    return [_stem(w) for w in _WORD.findall(lowered) if w not in STOPWORDS] + _COMPOUND.findall(lowered)


class Bm25Matrix:
    def __init__(self, weights: sparse.csc_matrix, vocabulary: dict[str, int]) -> None:
        self.weights = weights
        self.vocabulary = vocabulary

    @property
    def n_docs(self) -> int:
        return int(self.weights.shape[0])

    @classmethod
    def build(cls, texts: Sequence[str]) -> Bm25Matrix:
        corpus = [tokenize(t) for t in texts]
        if not corpus:
            return cls(sparse.csc_matrix((0, 0), dtype=np.float32), {})
        from rank_bm25 import BM25Okapi

        if not any(corpus):
            corpus[0] = ["\u2205"]  # rank-bm25 divides by the corpus length; one placeholder token avoids 0/0
        okapi = BM25Okapi(corpus, k1=K1, b=B, epsilon=EPSILON)
        vocabulary: dict[str, int] = {}
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for doc_index, (freqs, length) in enumerate(zip(okapi.doc_freqs, okapi.doc_len, strict=True)):
            norm = K1 * (1 - B + B * length / okapi.avgdl)
            for term, tf in freqs.items():
                col = vocabulary.setdefault(term, len(vocabulary))
                rows.append(doc_index)
                cols.append(col)
                vals.append(okapi.idf[term] * tf * (K1 + 1) / (tf + norm))
        matrix = sparse.csc_matrix(
            (np.asarray(vals, dtype=np.float32), (rows, cols)), shape=(len(corpus), len(vocabulary))
        )
        return cls(matrix, vocabulary)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every chunk for `query` (repeated query terms count repeatedly, as in rank-bm25)."""
        cols = [self.vocabulary[t] for t in tokenize(query) if t in self.vocabulary]
        if not cols or self.n_docs == 0:
            return np.zeros(self.n_docs, dtype=np.float32)
        # Straight from the CSC arrays: scipy's column slicing and sum cost ~0.3 ms per query in the server,
        # mostly validation and copies; the postings of a few terms are short.
        indptr, indices, data = self.weights.indptr, self.weights.indices, self.weights.data
        rows = np.concatenate([indices[indptr[c] : indptr[c + 1]] for c in cols])
        weights = np.concatenate([data[indptr[c] : indptr[c + 1]] for c in cols])
        return np.bincount(rows, weights=weights, minlength=self.n_docs).astype(np.float32)

    def idf(self, term: str) -> float:
        """How informative a (tokenized) term is: log(1 + N / df). A term no chunk holds weighs the most (df taken
        as 0.5), so a question's words the knowledge base lacks keep their share of the question."""
        col = self.vocabulary.get(term)
        df = 0 if col is None else int(self.weights.indptr[col + 1] - self.weights.indptr[col])
        return math.log(1 + self.n_docs / max(df, 0.5))

    def coverage(self, query: str, row: int) -> float:
        """The share of the query's information (idf mass of its distinct terms) that chunk `row` contains.
        Terms missing from the whole corpus weigh the most, so an off-topic question that shares a few
        common words with a chunk scores low. Uses the CSC structure directly (a few microseconds)."""
        terms = set(tokenize(query))
        if not terms or not 0 <= row < self.n_docs:
            return 0.0
        indptr, indices = self.weights.indptr, self.weights.indices
        total = found = 0.0
        for term in terms:
            col = self.vocabulary.get(term)
            idf = self.idf(term)
            total += idf
            if col is not None and bool(np.any(indices[indptr[col] : indptr[col + 1]] == row)):
                found += idf
        return found / total

    def weighted_scores(self, parts: Sequence[tuple[str, float]]) -> np.ndarray:
        """Sum of `weight * scores(text)`: a query whose parts count differently (a long message's question and the
        situation around it, app/rag/long_query.py)."""
        total = np.zeros(self.n_docs, dtype=np.float32)
        for text, weight in parts:
            if weight:
                total += np.float32(weight) * self.scores(text)
        return total

    def top(self, query: str, n: int) -> list[tuple[int, float]]:
        return self.top_of(self.scores(query), n)

    @staticmethod
    def top_of(scores: np.ndarray, n: int) -> list[tuple[int, float]]:
        """The `n` best rows of a score vector with a positive score, best first (ties in row order)."""
        hits = np.flatnonzero(scores > 0)
        if hits.size == 0:
            return []
        if hits.size > n:
            hits = hits[np.argpartition(-scores[hits], n - 1)[:n]]
        order = hits[np.argsort(-scores[hits], kind="stable")]
        return [(int(i), float(scores[i])) for i in order]

    def save(self, directory: Path) -> None:
        sparse.save_npz(directory / "bm25.npz", self.weights, compressed=False)
        (directory / "bm25_vocab.json").write_text(json.dumps(list(self.vocabulary)), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> Bm25Matrix:
        weights = sparse.load_npz(directory / "bm25.npz").tocsc()
        terms = json.loads((directory / "bm25_vocab.json").read_text(encoding="utf-8"))
        return cls(weights, {term: i for i, term in enumerate(terms)})
