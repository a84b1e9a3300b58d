"""Leave-one-out scoring of L2-normalised descriptors: per-query AP and first-hit rank, top-k
rankings, and the standard metrics (mAP, Top-1, P@k, chance mAP).

Protocol (../shared/docs/methods.md): every document queries all other documents; queries whose
writer has no other document in their gallery are not scored but stay in the gallery as
distractors. The query is excluded by index, never by assuming it ranks first. Ties in score are
broken by document order, so rankings are deterministic. Used by the retrieval stage and by
SAGHOG fine-tuning's validation (which needs nothing else of the retrieval stage).
"""
from __future__ import annotations

import faiss
import numpy as np
import pandas as pd
import scipy.sparse as sp


def expected_random_ap(n_relevant: int, gallery: int) -> float:
    """Expected AP of a uniformly random ranking (R relevant among G): (1/G)((R-1)/(G-1)(G - H_G) + H_G)."""
    if gallery <= 1:
        return 1.0
    h = float(np.sum(1.0 / np.arange(1, gallery + 1)))
    return ((n_relevant - 1) / (gallery - 1) * (gallery - h) + h) / gallery


def _ranks_of(row: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based ranks of the items `targets` in `row` sorted by descending score, ties by index."""
    t = row[targets][:, None]
    before = (row[None, :] > t) | ((row[None, :] == t) & (np.arange(len(row))[None, :] < targets[:, None]))
    return before.sum(axis=1) + 1


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best per row (k < row length), by descending score, ties by index."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    # argpartition may cut a tie at the k-th score arbitrarily: take every item tied with it too.
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1)
    rows = []
    for r in range(len(scores)):
        cand = np.flatnonzero(scores[r] >= kth[r])
        rows.append(cand[np.lexsort((cand, -scores[r, cand]))][:k])
    return np.stack(rows)


QUERY_COLUMNS = ["query_doc_id", "writer", "ap", "first_hit_rank", "n_relevant", "gallery_size", "p_at_5",
                 "p_at_10", "chance_ap"]


def _block_scorer(x):
    """(x, scores(a, b) of rows a:b against all rows) for dense, sparse (GNN) or sparse + low-rank (SGR) rows."""
    if hasattr(x, "scores"):  # sparse + low-rank rows (SGR)
        return x, x.scores
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
        xt = x.T.tocsc()
        return x, lambda a, b: (x[a:b] @ xt).toarray()
    x = np.ascontiguousarray(x, np.float32)
    return x, lambda a, b: faiss.pairwise_distances(x[a:b], x, faiss.METRIC_INNER_PRODUCT)


def score_queries(x: np.ndarray, writers, pages=None, exclude_same: str = "none", top_k: int = 100,
                  block: int = 512, doc_ids=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Leave-one-out retrieval on L2-normalised rows of `x`: (per-query table of the scored queries,
    rankings DataFrame of the top-k per query). Ranks of the relevant documents are counted exactly
    against the whole gallery (no full sort needed). `x` may be a scipy.sparse matrix (GNN rows) or
    anything with .shape and .scores(a, b) (SGR rows)."""
    x, block_scores = _block_scorer(x)
    n = x.shape[0]
    writers = np.asarray(writers)
    writer_codes = pd.factorize(writers)[0]
    if exclude_same == "page":
        if pages is None:
            raise ValueError("exclude_same: page needs the page of every document")
        page_codes = pd.factorize(np.asarray(pages))[0]
    doc_ids = np.asarray(doc_ids if doc_ids is not None else np.arange(n).astype(str))
    queries, parts = [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        scores = block_scores(start, stop)
        rows = np.arange(stop - start)
        scores[rows, rows + start] = -np.inf  # the query itself, by index
        if exclude_same == "page":
            scores[page_codes[start:stop, None] == page_codes[None, :]] = -np.inf
        parts.append(_top_k_rankings(scores, start, min(top_k, n - 1), doc_ids, writer_codes))
        gallery_sizes = np.isfinite(scores).sum(axis=1)
        for r in rows:
            q = start + r
            relevant = np.flatnonzero((writer_codes == writer_codes[q]) & np.isfinite(scores[r]))
            if len(relevant) == 0:  # no other document of the writer: a distractor, not a query
                continue
            hits = np.sort(_ranks_of(scores[r], relevant))
            queries.append((doc_ids[q], writers[q], float(np.mean(np.arange(1, len(hits) + 1) / hits)), int(hits[0]),
                            len(hits), int(gallery_sizes[r]), np.count_nonzero(hits <= 5) / 5.0,
                            np.count_nonzero(hits <= 10) / 10.0, expected_random_ap(len(hits), int(gallery_sizes[r]))))
    table = pd.DataFrame(queries, columns=QUERY_COLUMNS).astype(
        {"query_doc_id": str, "writer": str, "ap": float, "first_hit_rank": int, "n_relevant": int,
         "gallery_size": int})
    return table, pd.concat(parts, ignore_index=True)


def _top_k_rankings(scores, start, k, doc_ids, writer_codes) -> pd.DataFrame:
    top = _top_k(scores, k)
    top_scores = np.take_along_axis(scores, top, axis=1)
    keep = np.isfinite(top_scores)
    query_idx = np.broadcast_to((np.arange(len(scores)) + start)[:, None], top.shape)
    return pd.DataFrame({
        "query_doc_id": doc_ids[query_idx[keep]],
        "rank": np.broadcast_to(np.arange(1, k + 1), top.shape)[keep].astype(np.int32),
        "doc_id": doc_ids[top[keep]],
        "score": top_scores[keep].astype(np.float32),
        "relevant": (writer_codes[top] == writer_codes[query_idx])[keep]})


def summarise(queries: pd.DataFrame, n_docs: int) -> dict:
    """The standard metrics of a per-query table (NaN when no query could be scored)."""
    scored = len(queries) > 0

    def mean(values):
        return float(np.mean(values)) if scored else float("nan")

    return {"n_docs": n_docs, "n_queries": len(queries), "n_skipped_queries": n_docs - len(queries),
            "map": mean(queries.ap), "top1": mean(queries.first_hit_rank == 1), "p_at_5": mean(queries.p_at_5),
            "p_at_10": mean(queries.p_at_10), "chance_map": mean(queries.chance_ap),
            "median_first_hit_rank": float(np.median(queries.first_hit_rank)) if scored else float("nan")}


def evaluate(x: np.ndarray, writers, pages=None, exclude_same: str = "none", top_k: int = 100,
             block: int = 512, doc_ids=None):
    """Leave-one-out retrieval (score_queries): (metrics dict, rankings DataFrame of the top-k per query)."""
    queries, rankings = score_queries(x, writers, pages, exclude_same, top_k, block, doc_ids)
    return summarise(queries, x.shape[0]), rankings
