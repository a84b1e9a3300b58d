"""Retrieval stage: leave-one-out cosine retrieval over the test split (writer_retrieval.metrics),
the metrics row with writer-bootstrap confidence intervals (writer_retrieval.bootstrap), the
per-query table and the top-k rankings of one experiment."""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from .bootstrap import metric_intervals
from .lowrank import SparseLowRank
from .metrics import score_queries, summarise
from .storage import read_reranked, write_parquet

log = logging.getLogger("writer_retrieval")

RANKINGS_SCHEMA = pa.schema([("query_doc_id", pa.string()), ("rank", pa.int32()), ("doc_id", pa.string()),
                             ("score", pa.float32()), ("relevant", pa.bool_())])


METRICS_COLUMNS = ["dataset", "train_on", "features", "aggregation", "encoding", "rerank", "rerank_graph",
                   "n_docs", "n_queries", "n_skipped_queries", "n_writers", "map", "map_ci_low", "map_ci_high", "top1",
                   "top1_ci_low", "top1_ci_high", "ci_level", "p_at_5", "p_at_10", "chance_map",
                   "median_first_hit_rank", "pca", "pca_fit_on", "exclude_same", "extractor", "sweep",
                   "settings_hash", "code_version", "seconds"]


def run_experiment(descriptors_path, index_path, labels: dict, settings: dict, rankings_path, metrics_path,
                   queries_path, reranked_path=None) -> pd.DataFrame:
    """Score one experiment on the test split, on the descriptors or on their reranked rows: its
    metrics row (with bootstrap CIs), its per-query table and its top-k rankings."""
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
    queries, rankings = score_queries(x, meta.writer.to_numpy(), meta.page.to_numpy(), settings["exclude_same"],
                                      settings["top_k"], doc_ids=np.asarray(doc_ids))
    boot = settings["bootstrap"]
    intervals = metric_intervals(queries, boot["replicates"], boot["seed"], boot["level"])
    metrics = {**summarise(queries, len(doc_ids)), "n_writers": intervals["n_writers"], "ci_level": boot["level"],
               **{k: v for k, v in intervals.items() if "_ci_" in k}}
    write_parquet(rankings, rankings_path, RANKINGS_SCHEMA)
    write_parquet(queries, queries_path)
    row = {**labels, **metrics, "exclude_same": settings["exclude_same"],
           "seconds": time.perf_counter() - start_time}
    # Further labels (feature kind, device, per-stage seconds of the path) follow the fixed columns.
    table = pd.DataFrame([row])[METRICS_COLUMNS + [k for k in labels if k not in METRICS_COLUMNS]]
    write_parquet(table, metrics_path)
    log.info("%s / %s / %s / %s / %s: mAP %.4f [%.4f, %.4f], Top-1 %.4f, P@5 %.4f, P@10 %.4f on %d queries "
             "(%d skipped); chance mAP %.4f", labels["dataset"], labels["features"], labels["aggregation"],
             labels["encoding"], labels["rerank"], metrics["map"], metrics["map_ci_low"], metrics["map_ci_high"],
             metrics["top1"], metrics["p_at_5"], metrics["p_at_10"], metrics["n_queries"],
             metrics["n_skipped_queries"], metrics["chance_map"])
    return table
