"""Rerank stage: k-reciprocal (kRNN), similarity-graph (SGR) and GNN reranking on top-k neighbour graphs.

The published rerankers are dense N x N with Python loops over rows. Here every method works
on exact top-k neighbour lists (faiss) and scipy.sparse matrices, so memory is O(N (m + D)):
- kRNN only ever touches the top-k lists: identical to the dense method.
- GNN starts from a binary top-(k1+1) adjacency: one layer is identical to the dense method;
  with more layers rows are truncated to their `m` largest entries after each layer.
- SGR's kernel adjacency A0 = exp(-(1 - S)^2 / gamma) is positive everywhere, and at large N
  its many small entries carry most of a row's norm, so dropping them changes the rankings
  (by ~0.005-0.01 mAP in our tests). We keep the `m` strongest entries of each row exactly
  (default 100) and model all other entries by the straight line alpha + beta * S_ij fitted
  (least squares, on a seeded sample of pairs) to the kernel on the non-kept pairs. Because
  S = X X^T, that background is low rank: A0 = T + U V^T with T sparse (N x m) and
  U = [alpha, beta X], V = [1, X] (rank D + 1). Symmetrisation, propagation, row
  normalisation and cosine scoring are all done on this sparse + low-rank form
  (SparseLowRank), never forming N x N. Neighbours are chosen among the kept entries.
  Against the dense method this stays within 0.002 mAP (tests, N = 800).
Reranked descriptors: kRNN gives dense vectors (N x D), GNN sparse rows (N x N), SGR
sparse + low-rank rows; each row L2-normalised and scored by cosine like any descriptor.

Same-page exclusion (`groups`, settings `graph: other_pages`): on fragment data (HisFrag20) many
documents are cut from one page, the metric drops a query's own page from its gallery
(exclude_same: page), yet most of a fragment's nearest neighbours are its siblings, so an
unrestricted graph lets reranking draw its gain from documents the metric never scores. With
page codes as `groups`, no neighbour list holds a document of the row's own group (the row
itself stays first): neighbours() searches k + (largest group) deep and filters, kRNN and GNN
build their reciprocal lists / adjacency and propagation lists from those; SGR keeps the m
strongest other-group entries, cancels the background on same-group pairs (i != j) with
sparse entries -(alpha + beta S_ij) in T so that A0 is 0 there (sum of squared group sizes
extra entries), and never picks a same-group column among a layer's k strongest entries (its
truncation keeps those correction entries). Rows may still gain same-group columns by
propagation (two hops through another page), as in a dense reference with the same rules.
groups=None is the unrestricted graph, bit-identical to the code before this option.
"""
from __future__ import annotations

import logging
import time

import faiss
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError
from .lowrank import SparseLowRank, pair_dots
from .normalise import power_l2
from .storage import write_reranked

log = logging.getLogger("writer_retrieval")


def check_descriptors(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    zero = np.flatnonzero(np.linalg.norm(x, axis=1) < 1e-12)
    if len(zero):
        raise InputError(f"reranking needs non-zero descriptors; {len(zero)} are all zeros "
                         f"(first at row {zero[0]}): their cosine similarity is undefined")
    return power_l2(x)


def group_codes(groups, n: int) -> np.ndarray | None:
    """Groups (page codes, any labels) as codes 0..G-1, or None for the unrestricted graph."""
    if groups is None:
        return None
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have one entry per document: shape {groups.shape}, expected ({n},)")
    return np.unique(groups, return_inverse=True)[1].astype(np.int64).ravel()


def neighbours(x: np.ndarray, k: int, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, indices) per row by inner product, the row itself first.

    Faiss may rank an exact duplicate before the row itself; the row is put first by index.
    With groups, the k-1 others are the best documents of other groups."""
    groups = group_codes(groups, len(x))
    if groups is not None:
        return _other_group_neighbours(x, k, groups)
    k = min(k, len(x))
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    scores, idx = index.search(x, min(k + 1, len(x)))
    rows = np.arange(len(x))
    out_idx, out_s = idx[:, :k].copy(), scores[:, :k].copy()
    for r in np.flatnonzero(idx[:, 0] != rows):  # rare: a duplicate or tie came first
        others = idx[r] != r
        out_idx[r, 1:] = idx[r][others][: k - 1]
        out_s[r, 1:] = scores[r][others][: k - 1]
    out_idx[:, 0] = rows
    out_s[:, 0] = np.einsum("ij,ij->i", x, x)
    return out_s, out_idx


def _other_group_neighbours(x: np.ndarray, k: int, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """neighbours() without same-group documents: search k + (largest group) deep, then filter.

    At most g_r hits of a row are of its own group (itself included), so the search always
    returns k - 1 others; their faiss order (ties) is kept."""
    n = len(x)
    largest = int(np.bincount(groups).max())
    if k > n - largest + 1:  # some row has fewer than k - 1 documents of other groups
        log.warning("neighbours: k = %d cut to %d, the documents outside the largest group (%d) plus the row",
                    k, n - largest + 1, largest)
    k = min(k, n - largest + 1)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    scores, idx = index.search(x, min(k + largest, n))
    rows = np.arange(n)
    other = groups[idx] != groups[:, None]  # drops the row itself too
    pick = np.argsort(~other, axis=1, kind="stable")[:, : k - 1]  # other-group hits first, in faiss order
    out_idx = np.empty((n, k), idx.dtype)
    out_s = np.empty((n, k), scores.dtype)
    out_idx[:, 0], out_idx[:, 1:] = rows, np.take_along_axis(idx, pick, axis=1)
    out_s[:, 0], out_s[:, 1:] = np.einsum("ij,ij->i", x, x), np.take_along_axis(scores, pick, axis=1)
    assert other[rows[:, None], pick].all()
    return out_s, out_idx


def same_group_pairs(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of every pair i != j in one group: sum of squared group sizes minus N."""
    order = np.argsort(groups, kind="stable")
    sizes = np.bincount(groups)
    starts = np.cumsum(sizes) - sizes
    g = sizes[groups[order]]  # group size of each document, in group order
    rows = np.repeat(order, g)
    offset = np.arange(len(rows)) - np.repeat(np.cumsum(g) - g, g)  # 0..g-1 within each repeat
    cols = order[np.repeat(starts[groups[order]], g) + offset]
    keep = rows != cols
    return rows[keep], cols[keep]


def _same_entries(a: sp.csr_matrix, groups: np.ndarray | None) -> np.ndarray:
    """Per stored entry of `a` (data order): is it a same-group pair i != j."""
    if groups is None:
        return np.zeros(a.nnz, bool)
    rows = np.repeat(np.arange(a.shape[0]), np.diff(a.indptr))
    return (groups[rows] == groups[a.indices]) & (rows != a.indices)


def _sparse(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int) -> sp.csr_matrix:
    return sp.csr_matrix((values.ravel(), (np.repeat(rows, cols.shape[1]) if cols.ndim == 2 else rows, cols.ravel())),
                         shape=(n, n))


def _row_l2(a: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(a.multiply(a).sum(axis=1))).ravel()
    norms[norms == 0] = 1.0
    return sp.diags(1.0 / norms) @ a


def _truncate(a: sp.csr_matrix, m: int, groups: np.ndarray | None = None) -> sp.csr_matrix:
    """Keep the m largest entries of every row, and (with groups) every same-group entry:
    SGR's correction entries there must not fall back to the positive background."""
    a = a.tocsr()
    a.sort_indices()
    exempt = _same_entries(a, groups)
    counts = np.bincount(np.repeat(np.arange(a.shape[0]), np.diff(a.indptr))[~exempt], minlength=a.shape[0])
    if counts.max(initial=0) <= m:
        return a
    rows, cols, vals = [], [], []
    for r in range(a.shape[0]):
        lo, hi = a.indptr[r], a.indptr[r + 1]
        e = exempt[lo:hi]
        v, c = a.data[lo:hi][~e], a.indices[lo:hi][~e]
        if len(v) > m:
            top = np.argpartition(-v, m - 1)[:m]
            v, c = v[top], c[top]
        v, c = np.concatenate([a.data[lo:hi][e], v]), np.concatenate([a.indices[lo:hi][e], c])
        rows.append(np.full(len(v), r))
        cols.append(c)
        vals.append(v)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=a.shape)


def krnn(x: np.ndarray, k: int = 2, groups=None) -> np.ndarray:
    """k-reciprocal neighbour averaging: x_i <- L2((x_i + sum_{j in R(i)} x_j) / (|R(i)| + 1))."""
    x = check_descriptors(x)
    n = len(x)
    _, idx = neighbours(x, k + 1, groups)  # with groups: other-group lists, so reciprocal pairs are too
    knn = _sparse(np.arange(n), idx[:, 1:], np.ones((n, idx.shape[1] - 1), np.float32), n)
    reciprocal = knn.multiply(knn.T)  # j in N_k(i) and i in N_k(j)
    merged = (sp.identity(n, format="csr", dtype=np.float32) + reciprocal) @ x
    counts = np.asarray(reciprocal.sum(axis=1)).ravel() + 1
    merged = merged / counts[:, None]
    return power_l2(merged).astype(np.float32)


def _propagate(a: sp.csr_matrix, x: np.ndarray, k: int, weight_power: int, s_idx: np.ndarray | None = None) -> sp.csr_matrix:
    """One layer: A = (A + A^T)/2; A'_i = A_i + sum_{j in N(i)} w_ij A_j; rows L2-normalised.

    N(i): the given neighbour lists, the row itself included (GNN: top-(k2+1)), or else the k
    strongest entries of A_i after its first (SGR; ties by index); w_ij = S_ij ** weight_power."""
    n = a.shape[0]
    a = ((a + a.T) * 0.5).tocsr()
    if s_idx is None:
        rows, cols = [], []
        for r in range(n):
            lo, hi = a.indptr[r], a.indptr[r + 1]
            v, c = a.data[lo:hi], a.indices[lo:hi]
            order = np.lexsort((c, -v))[1: k + 1]
            rows.append(np.full(len(order), r))
            cols.append(c[order])
        rows, cols = np.concatenate(rows), np.concatenate(cols)
    else:
        rows, cols = np.repeat(np.arange(n), s_idx.shape[1]), s_idx.ravel()
    w = pair_dots(x, x, rows, cols) ** weight_power
    weights = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    return _row_l2(a + weights @ a).tocsr()


def fit_background(x: np.ndarray, s_val: np.ndarray, gamma: float, samples: int = 200_000, seed: int = 0,
                   groups: np.ndarray | None = None):
    """(alpha, beta) of the least-squares line kernel(S) ~ alpha + beta S over pairs outside the kept lists
    (with groups: other-group pairs only; same-group pairs are 0, not background)."""
    rng = np.random.default_rng(seed)
    n = len(x)
    i = rng.integers(0, n, samples)
    j = rng.integers(0, n, samples)
    s = pair_dots(x, x, i, j)
    outside = (i != j) & (s < s_val[i, -1])  # weaker than the row's m-th strongest: not kept
    if groups is not None:
        outside &= groups[i] != groups[j]
    s = s[outside].astype(np.float64)
    if len(s) < 2 or np.ptp(s) == 0:
        return float(np.exp(-1.0 / gamma)), 0.0
    beta, alpha = np.polyfit(s, np.exp(-((1.0 - s) ** 2) / gamma), 1)
    return float(alpha), float(beta)


def _sgr_layer(a: SparseLowRank, x: np.ndarray, k: int, groups: np.ndarray | None = None) -> SparseLowRank:
    """A = (A + A^T)/2; A'_i = A_i + sum_{j in N(i)} S_ij A_j; rows L2-normalised (N(i): the k
    strongest kept entries of A_i after its first, ties by index; with groups, same-group
    columns other than i are never chosen)."""
    n = a.shape[0]
    t = ((a.t + a.t.T) * 0.5).tocsr()
    t.sort_indices()
    if a.symmetric_low_rank:
        u, v = a.u, a.v
    else:  # (U V^T + V U^T) / 2 = [U V] [V U]^T / 2
        u, v = np.hstack([a.u, a.v]) * np.sqrt(0.5), np.hstack([a.v, a.u]) * np.sqrt(0.5)
    sym = SparseLowRank(t, u, v, symmetric_low_rank=True)
    values = sym.stored_entries()
    allowed = ~_same_entries(t, groups)
    chosen_rows, chosen_cols = [], []
    for r in range(n):
        lo, hi = t.indptr[r], t.indptr[r + 1]
        ok = allowed[lo:hi]
        c = t.indices[lo:hi][ok]
        order = np.lexsort((c, -values[lo:hi][ok]))[1: k + 1]
        chosen_rows.append(np.full(len(order), r))
        chosen_cols.append(c[order])
    rows, cols = np.concatenate(chosen_rows), np.concatenate(chosen_cols)
    w = sp.csr_matrix((pair_dots(x, x, rows, cols), (rows, cols)), shape=(n, n))
    propagated = SparseLowRank((t + w @ t).tocsr(), u + np.asarray(w @ u), v)
    d = sp.diags(1.0 / np.maximum(propagated.row_norms(), 1e-12))
    return SparseLowRank((d @ propagated.t).tocsr(), d @ propagated.u, v)


def sgr(x: np.ndarray, k: int = 2, layers: int = 1, gamma: float = 0.5, m: int = 100, groups=None) -> SparseLowRank:
    """Similarity graph reranking: exact strongest m kernel entries per row + low-rank background."""
    x = check_descriptors(x)
    n = len(x)
    groups = group_codes(groups, n)
    s_val, s_idx = neighbours(x, max(m, k + 1), groups)
    alpha, beta = fit_background(x, s_val, gamma, groups=groups)
    kept = np.exp(-((1.0 - s_val) ** 2) / gamma) - (alpha + beta * s_val)
    t = _sparse(np.arange(n), s_idx, kept, n)
    if groups is not None:  # A0 = 0 on same-group pairs: cancel the background there
        rows, cols = same_group_pairs(groups)
        if len(rows):
            cancel = -(alpha + beta * pair_dots(x, x, rows, cols))
            t = (t + sp.csr_matrix((cancel, (rows, cols)), shape=(n, n))).tocsr()
    u = np.hstack([np.full((n, 1), alpha), beta * x]).astype(np.float64)
    v = np.hstack([np.ones((n, 1)), x]).astype(np.float64)
    a = SparseLowRank(t, u, v, symmetric_low_rank=True)
    for layer in range(layers):
        a = _sgr_layer(a, x, k, groups)
        if layer < layers - 1:
            a = SparseLowRank(_truncate(a.t, m * (k + 1), groups), a.u, a.v)
    return a


def gnn(x: np.ndarray, k1: int = 1, k2: int = 2, layers: int = 1, m: int = 100, groups=None) -> sp.csr_matrix:
    """GNN reranking (Zhang et al. 2020): binary top-(k1+1) adjacency, propagation weighted by S^2 over top-(k2+1)."""
    x = check_descriptors(x)
    n = len(x)
    s_val, s_idx = neighbours(x, max(k1, k2) + 1, groups)  # with groups: adjacency and propagation lists other-group
    a = _sparse(np.arange(n), s_idx[:, : k1 + 1], np.ones((n, k1 + 1), np.float32), n)
    for _ in range(layers):
        a = _truncate(_propagate(a, x, k2, weight_power=2, s_idx=s_idx[:, : k2 + 1]), m)
    return a


def rerank(x: np.ndarray, settings: dict, groups=None):
    """Apply the configured reranker; returns dense (kRNN) or sparse (SGR, GNN) L2-normalised rows.

    groups: one page code per row (neighbour lists leave out the row's own page), or None."""
    method = settings["method"]
    groups = group_codes(groups, len(x))
    start = time.perf_counter()
    if method == "krnn":
        out = krnn(x, settings["k"], groups)
    elif method == "sgr":
        out = sgr(x, settings["k"], settings["layers"], settings["gamma"], settings["m"], groups)
    elif method == "gnn":
        out = gnn(x, settings["k1"], settings["k2"], settings["layers"], settings["m"], groups)
    else:
        raise ValueError(f"unknown reranker {method!r}; allowed: krnn, sgr, gnn")
    log.info("rerank %s on %d documents (%s): %.2f s", method, len(x),
             "all documents" if groups is None else f"other pages only, {groups.max() + 1} pages",
             time.perf_counter() - start)
    return out


def page_groups(doc_ids: np.ndarray, settings: dict, index_path=None) -> np.ndarray | None:
    """Page codes of doc_ids for settings graph: other_pages, None for graph: all (or no graph key)."""
    graph = settings.get("graph", "all")
    if graph == "all":
        return None
    if graph != "other_pages":
        raise ValueError(f"unknown rerank graph {graph!r}; allowed: all, other_pages")
    if index_path is None:
        raise ValueError("rerank graph: other_pages needs the dataset index (its page column); no index_path given")
    pages = pd.read_parquet(index_path, columns=["doc_id", "page"]).set_index("doc_id").page
    pages = pages.reindex(doc_ids)  # also refuses an index with duplicate doc_ids
    if pages.isna().any():
        raise ValueError(f"{index_path}: no page for {int(pages.isna().sum())} of {len(doc_ids)} test documents "
                         f"(first: {doc_ids[np.flatnonzero(pages.isna().to_numpy())[0]]})")
    return pd.factorize(pages.to_numpy())[0]


def rerank_test_split(descriptors_path, settings: dict, out_path, index_path=None) -> None:
    """Rerank the test documents of a descriptors.parquet and store the new rows (settings graph:
    other_pages reads the pages from index_path and leaves same-page documents out of the graph)."""
    from .pca import read_descriptors

    meta, x = read_descriptors(descriptors_path)
    test = (meta.split == "test").to_numpy()
    doc_ids = meta.doc_id[test].to_numpy().astype(str)
    groups = page_groups(doc_ids, settings, index_path)
    write_reranked(out_path, doc_ids, rerank(x[test], settings, groups))
