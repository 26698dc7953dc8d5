"""Clustering a corpus into domains (c-BTM, Gururangan et al. 2023): token tf-idf, balanced k-means.

Features of a text (a chunk, or at inference the context so far) are counted over its
tokens in the experts' shared tokenizer, so the router computes them causally from the
same ids the experts read: each token x_s adds one count to feature x_s (V unigram
features) and, after the first token, one to the bigram feature
V + hash(x_{s-1}, x_s) mod B (B = ``BIGRAM_BUCKETS``).

With n_f the count of feature f in a text, N the number of training chunks and df_f the
chunks containing f, the embedding is scikit-learn's tf-idf with smooth idf::

    idf_f = ln((1 + N) / (1 + df_f)) + 1,    e = (n ⊙ idf) / ||n ⊙ idf||

Balanced k-means (the c-BTM clustering): centres start from scikit-learn's k-means++ k-means
on the embeddings; then, until the assignment stops changing, every chunk is assigned
under a capacity of ceil(N / K) chunks per cluster (greedily, nearest (chunk, centre) pairs
first) and every centre moves to the mean of its chunks. Chunks have about equal size, so
the clusters have about equal bytes. Held-out chunks go to their nearest centre.
Everything is deterministic: a fixed seed, stable sorts, no thread-dependent reductions
in the assignment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sparse

BUCKET_BITS = 12
BIGRAM_BUCKETS = 1 << BUCKET_BITS
BIGRAM_HASH = 0x9E3779B97F4A7C15  # odd: multiplying by it mod 2^64 is a bijection
MAX_ITERATIONS = 50


def feature_count(vocab: int) -> int:
    return vocab + BIGRAM_BUCKETS


def bigram_features(previous: np.ndarray, current: np.ndarray, vocab: int) -> np.ndarray:
    """Feature index of each bigram (previous, current) of token ids (int64 arrays)."""
    key = (previous.astype(np.uint64) * np.uint64(vocab) + current.astype(np.uint64)) * np.uint64(BIGRAM_HASH)
    return vocab + (key >> np.uint64(64 - BUCKET_BITS)).astype(np.int64)  # the top bits: the best mixed


def text_features(tokens: np.ndarray, vocab: int) -> np.ndarray:
    """The features a token sequence adds, one per token and one per bigram."""
    tokens = np.asarray(tokens, np.int64)
    return np.concatenate([tokens, bigram_features(tokens[:-1], tokens[1:], vocab)])


def count_matrix(token_lists: list[np.ndarray], vocab: int) -> sparse.csr_matrix:
    """Counts (texts x features) of each text's features."""
    import scipy.sparse as sparse  # here, not at the top: every seedbed command imports this module
    indptr, indices, counts = [0], [], []
    for tokens in token_lists:
        features, feature_counts = np.unique(text_features(tokens, vocab), return_counts=True)
        indices.append(features)
        counts.append(feature_counts)
        indptr.append(indptr[-1] + len(features))
    return sparse.csr_matrix((np.concatenate(counts).astype(np.float64), np.concatenate(indices), np.array(indptr)),
                             shape=(len(token_lists), feature_count(vocab)))


def smooth_idf(counts: sparse.csr_matrix) -> np.ndarray:
    document_frequency = np.bincount(counts.indices, minlength=counts.shape[1])
    return np.log((1 + counts.shape[0]) / (1 + document_frequency)) + 1


def embed(counts: sparse.csr_matrix, idf: np.ndarray) -> sparse.csr_matrix:
    """Rows of ``counts`` weighted by idf and scaled to unit length (an empty row stays zero)."""
    import scipy.sparse as sparse
    weighted = sparse.csr_matrix(counts.multiply(idf[None, :]))
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(1)).ravel())
    return sparse.csr_matrix(sparse.diags(1 / np.where(norms > 0, norms, 1)) @ weighted)


def squared_distances(embedded: sparse.csr_matrix, centres: np.ndarray) -> np.ndarray:
    """||e - c_k||^2 for every row e and centre c_k, (rows, K)."""
    row_norms = np.asarray(embedded.multiply(embedded).sum(1))
    return row_norms - 2 * np.asarray(embedded @ centres.T) + (centres ** 2).sum(1)[None, :]


def balanced_assignment(distances: np.ndarray) -> np.ndarray:
    """Each row to a cluster, at most ceil(rows / K) rows per cluster: (row, cluster) pairs are
    taken nearest first (ties by row, then cluster), skipping full clusters and placed rows."""
    rows, k = distances.shape
    capacity = -(-rows // k)
    order = np.argsort(distances.ravel(), kind="stable")
    assignment = np.full(rows, -1, np.int64)
    filled = np.zeros(k, np.int64)
    placed = 0
    for flat in order:
        row, cluster = divmod(int(flat), k)
        if assignment[row] < 0 and filled[cluster] < capacity:
            assignment[row], placed = cluster, placed + 1
            filled[cluster] += 1
            if placed == rows:
                break
    return assignment


def balanced_kmeans(embedded: sparse.csr_matrix, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centres (K, F), assignment of each row) of balanced k-means (see the module docstring)."""
    import scipy.sparse as sparse
    from sklearn.cluster import KMeans

    if not 1 <= k <= embedded.shape[0]:
        raise ValueError(f"cannot make {k} clusters of {embedded.shape[0]} chunks")
    centres = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(embedded).cluster_centers_
    assignment = None
    for _ in range(MAX_ITERATIONS):
        new = balanced_assignment(squared_distances(embedded, centres))
        if assignment is not None and np.array_equal(new, assignment):
            break
        assignment = new
        members = sparse.csr_matrix((np.ones(len(new)), (new, np.arange(len(new)))), shape=(k, len(new)))
        centres = np.asarray((members @ embedded).todense()) / np.bincount(new, minlength=k)[:, None]
    return centres, assignment


def nearest(embedded: sparse.csr_matrix, centres: np.ndarray) -> np.ndarray:
    return squared_distances(embedded, centres).argmin(1)
