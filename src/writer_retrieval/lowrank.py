"""Rows of the form A = T + U V^T (T sparse, U and V dense and thin): the SGR reranker's
descriptors. Its own module because two stages need it: rerank builds such rows, retrieval
scores them (SparseLowRank.scores), and retrieval must not depend on the rerankers' code.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class SparseLowRank:
    """Rows A = T + U V^T: T sparse (N x N), U and V dense (N x r); never materialised."""

    def __init__(self, t: sp.csr_matrix, u: np.ndarray, v: np.ndarray, symmetric_low_rank: bool = False):
        self.t, self.u, self.v = t.tocsr(), u, v
        self.symmetric_low_rank = symmetric_low_rank  # U V^T is itself symmetric
        self._tv = self._gram = None

    @property
    def shape(self):
        return self.t.shape

    def tv(self) -> np.ndarray:
        if self._tv is None:
            self._tv = np.asarray(self.t @ self.v)
        return self._tv

    def times_gram(self, m: np.ndarray) -> np.ndarray:
        """m V^T V, without the r x r Gram matrix when r exceeds N (VLAD rows kept at their full
        dimension would make it gigabytes)."""
        n, r = self.v.shape
        if r > n:
            return (m @ self.v.T) @ self.v
        if self._gram is None:
            self._gram = self.v.T @ self.v
        return m @ self._gram

    def stored_entries(self) -> np.ndarray:
        """A_ij at T's stored positions, in T's data order."""
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.t.indptr))
        return self.t.data + pair_dots(self.u, self.v, rows, self.t.indices)

    def row_norms(self) -> np.ndarray:
        t2 = np.asarray(self.t.multiply(self.t).sum(axis=1)).ravel()
        cross = np.einsum("ij,ij->i", self.tv(), self.u)
        low = np.einsum("ij,ij->i", self.times_gram(self.u), self.u)
        return np.sqrt(np.maximum(t2 + 2 * cross + low, 0.0))

    def scores(self, a: int, b: int) -> np.ndarray:
        """A[a:b] A^T (dot products of rows a..b with all rows)."""
        ta, ua = self.t[a:b], self.u[a:b]
        out = (ta @ self.t.T).toarray()
        out += np.asarray(ta @ self.v) @ self.u.T
        out += ua @ self.tv().T
        out += self.times_gram(ua) @ self.u.T
        return out.astype(np.float32)

    def to_dense(self) -> np.ndarray:
        return self.t.toarray() + self.u @ self.v.T


def pair_dots(a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """a[rows[p]] . b[cols[p]] for every pair p, in bounded memory. Where the pairs cover much of
    a b^T, blocks of it are multiplied out (gathering wide rows per pair was 30 s for 200k pairs of
    19,200-d VLAD rows); otherwise the rows are gathered in chunks."""
    rows, cols = np.asarray(rows), np.asarray(cols)
    out = np.empty(len(rows), np.float64)
    if len(rows) * 4 >= len(a) * len(b):
        order = np.argsort(rows, kind="stable")
        block = max(64, chunk // max(len(b), 1))
        starts = np.arange(0, len(a), block)
        bounds = np.searchsorted(rows[order], np.append(starts, len(a)))
        for first, lo, hi in zip(starts, bounds[:-1], bounds[1:]):
            p = order[lo:hi]
            out[p] = (a[first:first + block] @ b.T)[rows[p] - first, cols[p]]
        return out
    for start in range(0, len(rows), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        out[start:start + chunk] = np.einsum("ij,ij->i", a[r], b[c])
    return out
