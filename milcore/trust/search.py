"""Nearest-neighbour search by cosine similarity behind one interface: exact (numpy) or faiss.

:func:`make_search` returns an object with ``search(queries (Q, D), k) -> (similarity (Q, k), index (Q, k))``
(most similar first; index -1 and similarity -inf where fewer than ``k`` vectors exist). Vectors and
queries are L2-normalised, so the inner product is the cosine similarity.

* ``exact``: one matrix product per block of queries (numpy BLAS), top-k by ``argpartition``. Exact and
  memory-bound: the vectors are held as float32, ``N x D x 4`` bytes.
* ``faiss``: ``faiss.IndexFlatIP`` (exact, SIMD; the same results as ``exact`` up to float rounding).
* ``faiss-ivf``: ``faiss.IndexIVFFlat`` (approximate: ``nlist`` k-means cells, ``nprobe`` of them searched),
  sub-linear query time for large indexes.
* ``auto``: ``exact`` up to :data:`EXACT_MAX_VECTORS` vectors, ``faiss-ivf`` beyond (``exact`` when faiss is
  not installed). ``benchmarks/bench_trust.py scaling`` measures where each pays off: the search structure is
  built anew each time an index is loaded, and training the IVF cells costs minutes at a few hundred thousand
  vectors (one exact query there: about 0.1 s), so IVF only pays off for thousands of queries per load.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import numpy as np

from feature_cache.errors import InvalidArgumentError, UserError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "exact", "faiss", "faiss-ivf")
#: ``auto`` searches exactly up to this many vectors (2M x 128-d float32: 1 GB), and with faiss IVF beyond
#: (benchmarks/README.md, "Trust layer": at 300k vectors IVF took 196 s to build, an exact query 0.11 s).
EXACT_MAX_VECTORS = 2_000_000
#: Query rows per block of the exact search (bounds the (Q, N) similarity block to ~256 MB at N = 250k).
_BLOCK_BYTES = 256 << 20


def normalize(x: np.ndarray) -> np.ndarray:
    """(N, D) float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norm, 1e-12), dtype=np.float32)


class VectorSearch(Protocol):
    """What every backend offers."""

    backend: str
    size: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) cosine similarities and (Q, k) vector indices, most similar first."""
        ...


def _pad(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    q, have = idx.shape
    if have >= k:
        return sims, idx
    return (np.concatenate([sims, np.full((q, k - have), -np.inf, np.float32)], axis=1),
            np.concatenate([idx, np.full((q, k - have), -1, np.int64)], axis=1))  # fmt: skip


class ExactSearch:
    """Exact cosine top-k with numpy (one matrix product per block of queries)."""

    backend = "exact"

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = normalize(vectors)  # (N, D)
        self.size = len(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) similarities and indices, most similar first."""
        q = normalize(queries)
        kk = min(k, self.size)
        if kk == 0 or not len(q):
            return _pad(np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64), k)
        rows = max(1, _BLOCK_BYTES // (4 * max(self.size, 1)))
        sims_out, idx_out = [], []
        for start in range(0, len(q), rows):
            s = q[start : start + rows] @ self.vectors.T  # (q, N)
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < self.size else np.tile(np.arange(self.size),
                                                                                               (len(s), 1))  # fmt: skip
            ps = np.take_along_axis(s, part, axis=1)
            order = np.argsort(-ps, axis=1, kind="stable")
            idx_out.append(np.take_along_axis(part, order, axis=1).astype(np.int64))
            sims_out.append(np.take_along_axis(ps, order, axis=1))
        return _pad(np.concatenate(sims_out), np.concatenate(idx_out), k)


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - depends on the installation
        raise UserError("the faiss search backends need the faiss-cpu package (pip install faiss-cpu)") from None
    return faiss


class FaissSearch:
    """faiss inner-product search on unit vectors: ``IndexFlatIP`` (exact) or ``IndexIVFFlat`` (approximate).

    Args:
        vectors: (N, D) vectors.
        ivf: use an inverted-file index (k-means into ``nlist`` cells; ``nprobe`` searched per query).
        nlist: k-means cells (default ``4 * sqrt(N)``, at most N / 39 so every cell gets training points).
        nprobe: cells searched per query.
        seed: k-means seed.
    """

    def __init__(self, vectors: np.ndarray, *, ivf: bool = False, nlist: int | None = None, nprobe: int = 16,
                 seed: int = 0) -> None:  # fmt: skip
        faiss = _faiss()
        x = normalize(vectors)
        self.size, dim = x.shape
        self.backend = "faiss-ivf" if ivf else "faiss"
        if ivf and self.size >= 2 * 39:
            nlist = nlist or int(4 * math.sqrt(self.size))
            nlist = max(1, min(nlist, self.size // 39))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.train(x)
            index.nprobe = min(nprobe, nlist)
            self.nlist, self.nprobe = nlist, index.nprobe
        else:  # too few vectors to train k-means cells: exact
            index = faiss.IndexFlatIP(dim)
            self.nlist, self.nprobe = 0, 0
        index.add(x)
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) similarities and indices, most similar first (-1 / -inf where fewer were found)."""
        q = normalize(queries)
        if not len(q) or k == 0:
            return np.zeros((len(q), k), np.float32), np.zeros((len(q), k), np.int64)
        sims, idx = self.index.search(q, min(k, max(self.size, 1)))
        sims = np.where(idx < 0, -np.inf, sims).astype(np.float32)
        return _pad(sims, idx.astype(np.int64), k)


def make_search(vectors: np.ndarray, backend: str = "auto", **options) -> VectorSearch:
    """A search structure over ``vectors`` (see the module docstring for the backends).

    Raises:
        InvalidArgumentError: an unknown backend.
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"search backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        if len(vectors) <= EXACT_MAX_VECTORS:
            return ExactSearch(vectors)
        try:
            _faiss()
        except UserError:
            log.warning("%d vectors: faiss-cpu is not installed, searching exactly with numpy", len(vectors))
            return ExactSearch(vectors)
        backend = "faiss-ivf"
    if backend == "exact":
        return ExactSearch(vectors)
    return FaissSearch(vectors, ivf=backend == "faiss-ivf", **options)
