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

    def gram(self) -> np.ndarray:
        if self._gram is None:
            self._gram = self.v.T @ self.v
        return self._gram

    def stored_entries(self) -> np.ndarray:
        """A_ij at T's stored positions, in T's data order."""
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.t.indptr))
        return self.t.data + pair_dots(self.u, self.v, rows, self.t.indices)

    def row_norms(self) -> np.ndarray:
        t2 = np.asarray(self.t.multiply(self.t).sum(axis=1)).ravel()
        cross = np.einsum("ij,ij->i", self.tv(), self.u)
        low = np.einsum("ij,ij->i", self.u @ self.gram(), self.u)
        return np.sqrt(np.maximum(t2 + 2 * cross + low, 0.0))

    def scores(self, a: int, b: int) -> np.ndarray:
        """A[a:b] A^T (dot products of rows a..b with all rows)."""
        ta, ua = self.t[a:b], self.u[a:b]
        out = (ta @ self.t.T).toarray()
        out += np.asarray(ta @ self.v) @ self.u.T
        out += ua @ self.tv().T
        out += (ua @ self.gram()) @ self.u.T
        return out.astype(np.float32)

    def to_dense(self) -> np.ndarray:
        return self.t.toarray() + self.u @ self.v.T


def pair_dots(a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """a[rows[p]] . b[cols[p]] for every pair p, in chunks (bounded memory)."""
    out = np.empty(len(rows), np.float64)
    for start in range(0, len(rows), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        out[start:start + chunk] = np.einsum("ij,ij->i", a[r], b[c])
    return out
