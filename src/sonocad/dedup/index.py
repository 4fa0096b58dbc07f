"""Searches of the duplicate finder that scale: nearest neighbours by inner product (exact in row blocks
below `settings.exact_below` images, a faiss HNSW graph above) and pHash pairs within a Hamming
distance found through hash buckets (multi-index hashing), so that no search builds an N x N array."""
from __future__ import annotations

from math import comb

import numpy as np

from ..runtime.extras import require
from .settings import DEFAULT, DedupSettings

BLOCK = 512          # rows of one block of an exact search: block x N similarities at a time
# The approximate search; bump FORMAT_VERSION when one of these changes
HNSW_LINKS = 32      # links per node of the HNSW graph (faiss's M)
HNSW_BUILD_EF = 40   # candidate list while the graph is built (faiss's default efConstruction)
ANN_DIMS = 128       # longer rows are searched by their projection on this many main directions ...
RERANK = 2           # ... for RERANK times the neighbours wanted, re-ranked by the exact inner product
PAIRS_PER_BATCH = 1 << 22   # bucket candidates verified at a time


def main_directions(rows: np.ndarray) -> np.ndarray | None:
    """(d, ANN_DIMS) projection on the main directions of rows longer than ANN_DIMS (not centred, so that
    inner products are kept as well as they can be); None for shorter rows."""
    from scipy.linalg import eigh
    from threadpoolctl import threadpool_limits

    d = rows.shape[1]
    if d <= ANN_DIMS:
        return None
    with threadpool_limits(1, "blas"):   # a d x d problem: threads only wait for each other
        vecs = eigh((rows.T @ rows).astype(np.float64), subset_by_index=[d - ANN_DIMS, d - 1], driver="evr")[1]
    return np.ascontiguousarray(vecs[:, ::-1], np.float32)


def require_index(n: int, settings: DedupSettings = DEFAULT, advice: str = "") -> None:
    """Stop before any work, with one line, when a search of `n` images would build an HNSW index (the
    embedding or match detector at `settings.exact_below` images or more) and faiss is not installed."""
    if n >= settings.exact_below and {"embed", "match"} & set(settings.detectors):
        require("faiss", f"the duplicate search of {n:,} images (an HNSW index from {settings.exact_below:,} "
                f"images on{advice})")


class AnnIndex:
    """Approximate nearest neighbours by inner product among the rows of `base`: a faiss HNSW graph of
    the rows (projected on their ANN_DIMS main directions when longer), built in one thread so that the
    same rows give the same graph; its candidates are re-ranked by the exact inner product."""

    def __init__(self, base: np.ndarray, settings: DedupSettings = DEFAULT):
        import faiss

        self.base, self.ef = np.ascontiguousarray(base, np.float32), settings.ann_ef
        self.project = main_directions(self.base)
        self.graph = faiss.IndexHNSWFlat(ANN_DIMS if self.project is not None else self.base.shape[1],
                                         HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        self.graph.hnsw.efConstruction = HNSW_BUILD_EF
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            self.graph.add(self._projected(self.base))
        finally:
            faiss.omp_set_num_threads(threads)

    def _projected(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x if self.project is None else x @ self.project, np.float32)

    def search(self, query: np.ndarray, k: int, own: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Indices and inner products (len(query), k) of the k rows nearest each row of `query`, best
        first; -1 and -inf where fewer were found. `own`: each query's own row, left out."""
        want = min(len(self.base), RERANK * k + 1)
        self.graph.hnsw.efSearch = max(self.ef, want)
        idx = self.graph.search(self._projected(query), want)[1].astype(np.int64)
        sims = np.empty(idx.shape, np.float32)
        for i0 in range(0, len(idx), BLOCK):   # exact inner products of the candidates, in bounded memory
            rows = idx[i0:i0 + BLOCK]
            sims[i0:i0 + BLOCK] = (self.base[np.maximum(rows, 0)] @ query[i0:i0 + BLOCK, :, None])[..., 0]
        invalid = idx < 0
        if own is not None:
            invalid |= idx == own[:, None]
        sims[invalid] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        idx, sims = np.take_along_axis(idx, order, 1), np.take_along_axis(sims, order, 1)
        idx[sims == -np.inf] = -1
        return idx, sims


def merge_nearest(lists: list[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """The k best distinct indices of each row of several (indices, scores) lists of one query set; an
    index in several lists counts with its best score. The k best by the maximum of two similarities
    are among the k best by each, so merging the two lists finds them exactly."""
    idx = np.concatenate([i for i, _ in lists], 1)
    sims = np.concatenate([s for _, s in lists], 1)
    order = np.argsort(-sims, axis=1, kind="stable")
    idx, sims = np.take_along_axis(idx, order, 1), np.take_along_axis(sims, order, 1)
    seen = np.zeros(idx.shape, bool)
    for c in range(1, idx.shape[1]):   # a repeat of an index met earlier in its row (with a higher score)
        seen[:, c] = (idx[:, :c] == idx[:, c:c + 1]).any(1)
    sims = np.where(seen | (idx < 0), -np.inf, sims)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, order, 1)


def neighbour_pairs(idx: np.ndarray) -> np.ndarray:
    """(P, 2) pairs i < j where j is in row i of `idx` or i in row j (-1 entries left out), each once."""
    rows = np.repeat(np.arange(len(idx)), idx.shape[1])
    pairs = np.stack([rows, idx.ravel()], 1)
    pairs = pairs[(pairs[:, 1] >= 0) & (pairs[:, 0] != pairs[:, 1])]
    return np.unique(np.sort(pairs, axis=1), axis=0)


def _pairs_above(n: int, block_scores, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs i < j (P, 2) whose score reaches `threshold`, and the scores, from (rows, N) blocks of scores
    `block_scores(i0, i1)`: all pairs, BLOCK rows at a time."""
    pairs, scores = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.float32)]
    for i0 in range(0, n, BLOCK):
        s = block_scores(i0, i0 + BLOCK)
        a, b = np.nonzero((s >= threshold) & (np.arange(i0, i0 + len(s))[:, None] < np.arange(n)[None, :]))
        pairs.append(np.stack([i0 + a, b], 1)), scores.append(s[a, b])
    return np.concatenate(pairs).astype(np.int64), np.concatenate(scores).astype(np.float32)


def _unique_pairs(pairs: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs sorted as (min, max) and by row, each once (with the score it was first found with)."""
    pairs, first = np.unique(np.sort(pairs.reshape(-1, 2), axis=1), axis=0, return_index=True)
    return pairs.astype(np.int64), scores[first]


def similar_pairs(x: np.ndarray, threshold: float, settings: DedupSettings = DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """Pairs i < j (P, 2) of rows whose inner product reaches `threshold`, and those products: all pairs
    below `settings.exact_below` rows, else neighbours in an HNSW index, asked for four times more for
    the rows whose last neighbour still reaches the threshold."""
    n = len(x)
    if n < settings.exact_below:
        return _pairs_above(n, lambda i0, i1: x[i0:i1] @ x.T, threshold)
    index, pairs, sims = AnnIndex(x, settings), [], []
    rows, k = np.arange(n), min(n - 1, 16)
    while len(rows):
        idx, s = index.search(x[rows], k, own=rows)
        hit = (s >= threshold) & (idx >= 0)
        a, b = np.nonzero(hit)
        pairs.append(np.stack([rows[a], idx[a, b]], 1)), sims.append(s[a, b])
        rows, k = rows[hit[:, -1] & (k < n - 1)], min(n - 1, 4 * k)
    return _unique_pairs(np.concatenate(pairs), np.concatenate(sims).astype(np.float32))


def phash_pairs(hashes: np.ndarray, threshold: float, settings: DedupSettings = DEFAULT):
    """Pairs i < j (P, 2) of (N, 64) bool hashes whose score 1 - Hamming distance / 64 reaches
    `threshold`, and those scores (float32): all pairs below `settings.exact_below` hashes, else
    through hash buckets (`hamming_pairs`)."""
    from .features import phash_similarity

    n = len(hashes)
    if n < settings.exact_below:
        return _pairs_above(n, lambda i0, i1: phash_similarity(hashes[i0:i1], hashes), threshold)
    score = 1.0 - np.arange(65, dtype=np.float32) / 64      # the score of each distance, as phash_similarity
    radius = int(np.flatnonzero(score >= threshold).max(initial=-1))
    if radius < 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    pairs, dist = hamming_pairs(hashes, radius)
    return pairs, score[dist]


def _words(hashes: np.ndarray) -> np.ndarray:
    """(N, 64) bool hashes as (N,) uint64."""
    return np.packbits(hashes.astype(bool), axis=1, bitorder="little").view("<u8").ravel()


_BYTE_BITS = np.array([bin(b).count("1") for b in range(256)], np.int64)


def _bits_set(words: np.ndarray) -> np.ndarray:
    """Number of bits set in each uint64 (numpy 1.x has no bitwise_count)."""
    return _BYTE_BITS[words.view(np.uint8).reshape(-1, 8)].sum(1)


def _parts(n: int, radius: int, bits: int = 64) -> list[tuple[int, int]]:
    """(first bit, width) of the hash's parts for multi-index hashing, their number m chosen to cost least
    for n hashes (bucket probes plus expected candidates): each part is searched within radius // m."""
    def cost(m):
        w = bits // m
        return m * sum(comb(w, r) for r in range(radius // m + 1)) * n * (1 + n / 2 ** w)

    m = min(range(1, min(radius + 1, bits) + 1), key=cost)
    edges = np.linspace(0, bits, m + 1).round().astype(int)
    return [(int(a), int(b - a)) for a, b in zip(edges[:-1], edges[1:])]


def _flips(width: int, radius: int) -> np.ndarray:
    """All masks of `width` bits with at most `radius` bits set."""
    from itertools import combinations

    return np.array([sum(1 << b for b in c) for r in range(radius + 1) for c in combinations(range(width), r)],
                    np.uint64)


def _bucket_candidates(count: np.ndarray):
    """Slices [q0, q1) of the queries whose bucket members (`count` each) add up to at most
    PAIRS_PER_BATCH (a query with more stands alone)."""
    ends, q0 = np.cumsum(count), 0
    while q0 < len(count):
        q1 = max(q0 + 1, int(np.searchsorted(ends, ends[q0] - count[q0] + PAIRS_PER_BATCH, "right")))
        yield q0, q1
        q0 = q1


def hamming_pairs(hashes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs i < j (P, 2) of (N, 64) bool hashes within Hamming distance `radius`, and their distances,
    found through buckets (multi-index hashing): the hash is cut into m parts, each part's value keys a
    bucket, and every hash visits, on each part, the buckets within radius // m bits of its own; a pair
    within `radius` differs by at most that on some part. Candidates are verified in batches."""
    n, words = len(hashes), _words(hashes)
    parts = _parts(n, radius)
    pairs, dists = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.int64)]
    for lo, width in parts:
        key = (words >> np.uint64(lo)) & np.uint64((1 << width) - 1)
        order = np.argsort(key, kind="stable")
        sorted_keys = key[order]
        for flip in _flips(width, radius // len(parts)):
            probe = key ^ flip
            start = np.searchsorted(sorted_keys, probe, "left")
            count = np.searchsorted(sorted_keys, probe, "right") - start
            for q0, q1 in _bucket_candidates(count):
                c = count[q0:q1]
                i = np.repeat(np.arange(q0, q1), c)
                j = order[np.repeat(start[q0:q1] - (np.cumsum(c) - c), c) + np.arange(len(i))]
                d = _bits_set(words[i] ^ words[j])
                ok = (i < j) & (d <= radius)
                pairs.append(np.stack([i[ok], j[ok]], 1)), dists.append(d[ok])
    return _unique_pairs(np.concatenate(pairs), np.concatenate(dists))
