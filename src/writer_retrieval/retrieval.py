"""Retrieval stage: leave-one-out cosine retrieval over the test split and the standard metrics.

Protocol (../shared/docs/methods.md): every test document queries all other test documents;
queries whose writer has no other document in their gallery are not scored but stay in the
gallery as distractors. The query is excluded by index, never by assuming it ranks first.
Ties in score are broken by document order (doc_id), so rankings are deterministic.
"""
from __future__ import annotations

import logging
import time

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from .lowrank import SparseLowRank
from .storage import read_reranked, write_parquet

log = logging.getLogger("writer_retrieval")

RANKINGS_SCHEMA = pa.schema([("query_doc_id", pa.string()), ("rank", pa.int32()), ("doc_id", pa.string()),
                             ("score", pa.float32()), ("relevant", pa.bool_())])


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


def evaluate(x: np.ndarray, writers, pages=None, exclude_same: str = "none", top_k: int = 100,
             block: int = 512, doc_ids=None):
    """Leave-one-out retrieval on L2-normalised rows of `x`.

    Returns (metrics dict, rankings DataFrame of the top-k per query). Ranks of the relevant
    documents are counted exactly against the whole gallery (no full sort needed). `x` may be
    a scipy.sparse matrix (GNN rows) or anything with .shape and .scores(a, b) (SGR rows).
    """
    if hasattr(x, "scores"):  # sparse + low-rank rows (SGR)
        block_scores = x.scores
    elif sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
        xt = x.T.tocsc()

        def block_scores(a, b):
            return (x[a:b] @ xt).toarray()
    else:
        x = np.ascontiguousarray(x, np.float32)

        def block_scores(a, b):
            return faiss.pairwise_distances(x[a:b], x, faiss.METRIC_INNER_PRODUCT)
    n = x.shape[0]
    writer_codes = pd.factorize(np.asarray(writers))[0]
    if exclude_same == "page":
        if pages is None:
            raise ValueError("exclude_same: page needs the page of every document")
        page_codes = pd.factorize(np.asarray(pages))[0]
    doc_ids = np.asarray(doc_ids if doc_ids is not None else np.arange(n).astype(str))
    aps, top1, p5, p10, chance, first_hit = [], [], [], [], [], []
    parts = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        scores = block_scores(start, stop)
        rows = np.arange(stop - start)
        scores[rows, rows + start] = -np.inf  # the query itself, by index
        if exclude_same == "page":
            scores[page_codes[start:stop, None] == page_codes[None, :]] = -np.inf
        gallery_sizes = np.isfinite(scores).sum(axis=1)
        k = int(min(top_k, n - 1))
        top = _top_k(scores, k)
        top_scores = np.take_along_axis(scores, top, axis=1)
        keep = np.isfinite(top_scores)
        query_idx = np.broadcast_to((rows + start)[:, None], top.shape)
        parts.append(pd.DataFrame({
            "query_doc_id": doc_ids[query_idx[keep]],
            "rank": np.broadcast_to(np.arange(1, k + 1), top.shape)[keep].astype(np.int32),
            "doc_id": doc_ids[top[keep]],
            "score": top_scores[keep].astype(np.float32),
            "relevant": (writer_codes[top] == writer_codes[query_idx])[keep]}))
        for r in rows:
            q = start + r
            relevant = np.flatnonzero((writer_codes == writer_codes[q]) & np.isfinite(scores[r]))
            if len(relevant) == 0:
                continue
            hits = np.sort(_ranks_of(scores[r], relevant))
            aps.append(float(np.mean(np.arange(1, len(hits) + 1) / hits)))
            top1.append(bool(hits[0] == 1))
            p5.append(np.count_nonzero(hits <= 5) / 5.0)
            p10.append(np.count_nonzero(hits <= 10) / 10.0)
            chance.append(expected_random_ap(len(hits), int(gallery_sizes[r])))
            first_hit.append(int(hits[0]))
    n_queries = len(aps)
    nan = float("nan")
    metrics = {
        "n_docs": n, "n_queries": n_queries, "n_skipped_queries": n - n_queries,
        "map": float(np.mean(aps)) if aps else nan,
        "top1": float(np.mean(top1)) if aps else nan,
        "p_at_5": float(np.mean(p5)) if aps else nan,
        "p_at_10": float(np.mean(p10)) if aps else nan,
        "chance_map": float(np.mean(chance)) if aps else nan,
        "median_first_hit_rank": float(np.median(first_hit)) if aps else nan,
    }
    return metrics, pd.concat(parts, ignore_index=True)


METRICS_COLUMNS = ["dataset", "features", "aggregation", "rerank", "n_docs", "n_queries", "n_skipped_queries",
                   "map", "top1", "p_at_5", "p_at_10", "chance_map", "median_first_hit_rank", "pca_fit_on",
                   "exclude_same", "settings_hash", "code_version", "seconds"]


def run_experiment(descriptors_path, index_path, labels: dict, settings: dict, rankings_path, metrics_path,
                   reranked_path=None) -> pd.DataFrame:
    """Score one experiment on the test split, on the descriptors or on their reranked rows."""
    from .pca import read_descriptors

    start_time = time.perf_counter()
    index = pd.read_parquet(index_path, columns=["doc_id", "writer", "page"]).set_index("doc_id")
    if reranked_path:
        doc_ids, x = read_reranked(reranked_path, SparseLowRank)
    else:
        meta, x = read_descriptors(descriptors_path)
        test = (meta.split == "test").to_numpy()
        doc_ids, x = meta.doc_id[test].to_numpy(), x[test]
    if len(doc_ids) < 2:
        raise ValueError(f"{descriptors_path}: fewer than 2 test documents; nothing to retrieve")
    meta = index.loc[list(doc_ids)]
    metrics, rankings = evaluate(x, meta.writer.to_numpy(), meta.page.to_numpy(), settings["exclude_same"],
                                 settings["top_k"], doc_ids=np.asarray(doc_ids))
    write_parquet(rankings, rankings_path, RANKINGS_SCHEMA)
    row = {**labels, **metrics, "exclude_same": settings["exclude_same"],
           "seconds": time.perf_counter() - start_time}
    # Further labels (feature kind, device, per-stage seconds of the path) follow the fixed columns.
    table = pd.DataFrame([row])[METRICS_COLUMNS + [k for k in labels if k not in METRICS_COLUMNS]]
    write_parquet(table, metrics_path)
    log.info("%s / %s / %s / %s: mAP %.4f, Top-1 %.4f, P@5 %.4f, P@10 %.4f on %d queries (%d skipped); "
             "chance mAP %.4f", labels["dataset"], labels["features"], labels["aggregation"], labels["rerank"],
             metrics["map"], metrics["top1"], metrics["p_at_5"], metrics["p_at_10"], metrics["n_queries"],
             metrics["n_skipped_queries"], metrics["chance_map"])
    return table
