"""Exact and near-exact duplicate texts, found before splitting so that no copy of a training
text is scored as unseen.

Exact copies share the hash of their normalised text (lower case, runs of anything but letters
and digits folded to one space). Near-exact copies (a corrected typo, a changed headline, an
added sentence) have a TF-IDF cosine similarity of at least `threshold` over word unigrams.
Copies are grouped transitively; each group keeps its first text.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.feature_extraction.text import TfidfVectorizer

NEAR_THRESHOLD = 0.9
METHOD = "sha1 of the normalised text (exact), TF-IDF word-unigram cosine >= threshold (near), first of each group kept"
# Rows of the similarity matrix computed at once (bounds memory on large corpora).
_BLOCK_ROWS = 2048
_NOT_WORD = re.compile(r"[^\w]+|_")


@dataclass(frozen=True)
class Deduplication:
    kept: list[int]
    examples_before: int
    exact_removed: int
    near_removed: int
    threshold: float
    method: str = METHOD

    def summary(self) -> dict:
        """What a run's data section records (everything but the kept indices)."""
        return {key: value for key, value in asdict(self).items() if key != "kept"}


def normalise(text: str) -> str:
    return _NOT_WORD.sub(" ", text.lower()).strip()


def find_duplicates(texts: list[str], threshold: float = NEAR_THRESHOLD) -> Deduplication:
    """Which texts to keep: the first of every group of exact or near-exact copies."""
    count = len(texts)
    first_of_hash: dict[str, int] = {}
    exact_parent = np.arange(count)
    for index, text in enumerate(texts):
        digest = hashlib.sha1(normalise(text).encode()).hexdigest()
        exact_parent[index] = first_of_hash.setdefault(digest, index)
    exact_kept = np.flatnonzero(exact_parent == np.arange(count))
    exact_removed = count - len(exact_kept)

    # Near copies among the texts that are not exact copies of an earlier one.
    vectors = TfidfVectorizer(lowercase=True).fit_transform([texts[i] for i in exact_kept])
    rows, cols = [], []
    for start in range(0, vectors.shape[0], _BLOCK_ROWS):
        similar = (vectors[start : start + _BLOCK_ROWS] @ vectors.T).tocoo()
        pair = similar.data >= threshold
        rows.append(similar.row[pair] + start)
        cols.append(similar.col[pair])
    row, col = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(row), np.int8), (row, col)), shape=(len(exact_kept),) * 2)
    _, group = connected_components(graph, directed=False)
    _, first_in_group = np.unique(group, return_index=True)
    kept = sorted(exact_kept[first_in_group].tolist())
    return Deduplication(kept=kept, examples_before=count, exact_removed=exact_removed,
                         near_removed=len(exact_kept) - len(kept), threshold=threshold)
