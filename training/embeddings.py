"""Token embeddings initialised from the training texts themselves (latent semantic analysis):
the truncated SVD of the training split's TF-IDF document-token matrix.

Tokens that occur in the same documents get similar vectors before the classifier has seen a
single label, which a model learning from a few thousand texts cannot work out alone.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfTransformer

EMBEDDING_INITS = ("random", "svd")
METHOD = ("sklearn TruncatedSVD (randomized, seeded) of the training split's TF-IDF document x token matrix "
          "(sublinear tf), token vectors = right singular vectors x singular values, scaled to unit variance")


def svd_embeddings(token_ids: list[list[int]], vocab_size: int, dim: int, seed: int, pad_id: int = 0) -> np.ndarray:
    """float32 [vocab_size, dim]; tokens that no training text holds get small seeded noise, the
    padding token zeros. The same token ids and seed always give the same table."""
    rows = np.repeat(np.arange(len(token_ids)), [len(ids) for ids in token_ids])
    columns = np.fromiter((token for ids in token_ids for token in ids), dtype=np.int64, count=len(rows))
    counts = csr_matrix((np.ones(len(rows), np.float64), (rows, columns)), shape=(len(token_ids), vocab_size))
    counts.sum_duplicates()
    weighted = TfidfTransformer(sublinear_tf=True).fit_transform(counts)
    svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=7, random_state=seed).fit(weighted)
    unseen = np.asarray(counts.sum(axis=0)).ravel() == 0
    table = svd.components_.T * svd.singular_values_
    table /= table[~unseen].std()
    table[unseen] = np.random.default_rng(seed).normal(0.0, 0.1, (int(unseen.sum()), dim))
    table[pad_id] = 0.0
    return table.astype(np.float32)
