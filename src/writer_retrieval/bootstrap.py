"""Uncertainty of retrieval metrics: writer-resampled bootstrap intervals and paired comparisons.

Protocol. The unit of resampling is the *writer*, not the query: queries of one writer share a
hand and are correlated, so resampling queries would understate the spread. Each bootstrap
replicate draws W writers uniformly with replacement out of the W writers present (W integer
draws, ``rng.integers(0, W)``); a writer drawn k times contributes all of its queries k times.
The replicate statistic is the mean over all queries so contributed,

    stat_b = sum_w c_bw * S_w / sum_w c_bw * n_w,

with c_bw the number of times writer w was drawn in replicate b, S_w the sum of the per-query
values of writer w and n_w its number of queries. The interval is the percentile interval:
[low, high] = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2], method="linear"), i.e.
numpy's default (Hyndman & Fan type 7) interpolation between order statistics. Draws come from
``np.random.default_rng(seed)`` in blocks of ``_BLOCK`` replicates, so a seed fixes the result.
With a single writer every replicate is the observed mean and the interval collapses to it:
the between-writer spread cannot be estimated from one writer.

A paired comparison of two methods on the same test set joins their per-query tables on
``query_doc_id`` and bootstraps the mean per-query AP difference with the same writer draws
applied to both methods at once (the difference is resampled, not each method separately).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import InputError

PER_QUERY_COLUMNS = ("query_doc_id", "writer", "ap", "first_hit_rank", "n_relevant", "gallery_size")
METRIC_COLUMNS = ("map", "top1")  # column order of per_query_metrics
TIE_TOL = 1e-12  # |delta AP| below this is a tie: float noise of identical rankings
_BLOCK = 256  # replicates per block of draws: bounds memory at ~3 * _BLOCK * W * 8 bytes


def _writer_totals(values: np.ndarray, writers) -> tuple[np.ndarray, np.ndarray]:
    """Per-writer sums (W, M) and query counts (W,), aggregated once so replicates cost O(W)."""
    codes, _ = pd.factorize(np.asarray(writers), use_na_sentinel=False)
    n_writers = int(codes.max()) + 1
    sums = np.stack([np.bincount(codes, weights=col, minlength=n_writers) for col in values.T], axis=1)
    counts = np.bincount(codes, minlength=n_writers).astype(np.float64)
    return sums, counts


def _replicate_stats(draw_counts: np.ndarray, sums: np.ndarray, n_queries: np.ndarray) -> np.ndarray:
    """Replicate means (B, M) from how often each writer was drawn (B, W): queries weigh equally."""
    draw_counts = np.asarray(draw_counts, dtype=np.float64)  # float so the products go through BLAS
    return (draw_counts @ sums) / (draw_counts @ n_queries)[:, None]


def _draw_counts(n_writers: int, n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """(n_rows, W) counts of each writer among W uniform draws with replacement, one row per replicate."""
    draws = rng.integers(0, n_writers, size=(n_rows, n_writers))
    flat = (draws + n_writers * np.arange(n_rows)[:, None]).ravel()  # offset rows: one bincount for all
    return np.bincount(flat, minlength=n_rows * n_writers).reshape(n_rows, n_writers)


def _percentile_interval(stats: np.ndarray, level: float) -> np.ndarray:
    """Percentile interval (M, 2) of replicate statistics (B, M); numpy's 'linear' quantiles."""
    alpha = 1.0 - level
    return np.quantile(stats, [alpha / 2, 1 - alpha / 2], axis=0, method="linear").T


def bootstrap_replicates(values: np.ndarray, writers, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Replicate statistics (n_boot, M) of the writer bootstrap of the mean of each column."""
    values = np.asarray(values, dtype=np.float64)
    values = values[:, None] if values.ndim == 1 else values
    if values.ndim != 2 or len(values) != len(writers):
        raise InputError(f"values must be (Q,) or (Q, M) with Q = len(writers) = {len(writers)}; "
                         f"got shape {values.shape}")
    if n_boot < 1:
        raise InputError(f"n_boot must be at least 1, got {n_boot}")
    if np.isnan(values).any():  # a NaN would silently turn every replicate containing it into NaN
        raise InputError(f"{int(np.isnan(values).any(axis=1).sum())} of {len(values)} queries have NaN values")
    if len(values) == 0:
        return np.full((n_boot, values.shape[1]), np.nan)
    sums, n_queries = _writer_totals(values, writers)
    rng = np.random.default_rng(seed)
    blocks = [_replicate_stats(_draw_counts(len(sums), min(_BLOCK, n_boot - start), rng), sums, n_queries)
              for start in range(0, n_boot, _BLOCK)]
    return np.concatenate(blocks, axis=0)


def writer_bootstrap(values: np.ndarray, writers, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> np.ndarray:
    """Percentile CI [low, high] of the mean over queries of each column, writers resampled.

    values: (Q,) or (Q, M) per-query values; writers: (Q,) writer labels. Returns (2,) for 1-d
    input, else (M, 2). Empty input gives NaNs. See the module docstring for the protocol.
    """
    if not 0.0 < level < 1.0:
        raise InputError(f"level must lie strictly between 0 and 1, got {level}")
    one_d = np.ndim(values) == 1
    interval = _percentile_interval(bootstrap_replicates(values, writers, n_boot, seed), level)
    return interval[0] if one_d else interval


def _check_per_query(table: pd.DataFrame, name: str, columns=PER_QUERY_COLUMNS) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{name} per-query table lacks columns {missing}")
    duplicated = table["query_doc_id"].duplicated()
    if duplicated.any():  # a repeated query would be joined, and so counted, more than once
        raise InputError(f"{name} per-query table repeats query_doc_id "
                         f"{table.loc[duplicated, 'query_doc_id'].head(3).tolist()}")


def per_query_metrics(table: pd.DataFrame) -> np.ndarray:
    """(Q, 2) float64 per-query values whose column means are mAP and Top-1 (METRIC_COLUMNS)."""
    _check_per_query(table, "the", ("ap", "first_hit_rank"))
    return np.column_stack([table["ap"].to_numpy(np.float64),
                            (table["first_hit_rank"].to_numpy() == 1).astype(np.float64)])


def metric_intervals(table: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """mAP and Top-1 of a per-query table with their writer-bootstrap percentile intervals."""
    _check_per_query(table, "the", ("writer", "ap", "first_hit_rank"))
    values = per_query_metrics(table)
    ci = writer_bootstrap(values, table["writer"].to_numpy(), n_boot, seed, level)
    out = {"n_queries": len(table), "n_writers": int(table["writer"].nunique())}
    for j, name in enumerate(METRIC_COLUMNS):
        out[name] = float(values[:, j].mean()) if len(values) else float("nan")
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(ci[j, 0]), float(ci[j, 1])
    return out


def paired_comparison(method: pd.DataFrame, baseline: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Mean per-query AP difference (method - baseline) on shared queries, with a writer-bootstrap CI.

    Queries are paired on query_doc_id (inner join); both tables must agree on each query's writer.
    share_improved / share_worsened count queries with delta > TIE_TOL / delta < -TIE_TOL.
    """
    for table, name in ((method, "method"), (baseline, "baseline")):
        _check_per_query(table, name, ("query_doc_id", "writer", "ap"))
    pairs = method[["query_doc_id", "writer", "ap"]].merge(
        baseline[["query_doc_id", "writer", "ap"]], on="query_doc_id", suffixes=("_m", "_b"))
    if pairs.empty:
        raise InputError(f"method ({len(method)} queries) and baseline ({len(baseline)} queries) "
                         "share no query_doc_id")
    disagree = pairs["writer_m"] != pairs["writer_b"]
    if disagree.any():  # same query, different writer: the tables come from different test sets
        raise InputError(f"method and baseline disagree on the writer of {int(disagree.sum())} queries, "
                         f"e.g. {pairs.loc[disagree, 'query_doc_id'].head(3).tolist()}")
    delta = pairs["ap_m"].to_numpy(np.float64) - pairs["ap_b"].to_numpy(np.float64)
    low, high = writer_bootstrap(delta, pairs["writer_m"].to_numpy(), n_boot, seed, level)
    return {"n_paired": len(pairs), "n_method": len(method), "n_baseline": len(baseline),
            "n_writers": int(pairs["writer_m"].nunique()),
            "delta_map": float(delta.mean()), "delta_map_ci_low": float(low), "delta_map_ci_high": float(high),
            "share_improved": float(np.mean(delta > TIE_TOL)), "share_worsened": float(np.mean(delta < -TIE_TOL))}
