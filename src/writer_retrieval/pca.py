"""PCA whitening stage: fit on the train split (default) or the test split (transductive, recorded),
whiten, L2-normalise, and write descriptors.parquet (doc_id, writer, split, descriptor)."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.decomposition import PCA

from .normalise import power_l2
from .storage import read_array_shard, write_json, write_parquet

log = logging.getLogger("writer_retrieval")

# Components whose variance is below this share of the largest are noise or rank deficiency:
# whitening would divide by ~0 and blow them up, so they are dropped.
RANK_TOLERANCE = 1e-6


class Whitening:
    """PCA whitening with a rank guard; transform = (x - mean) P^T / sqrt(var), then L2."""

    def __init__(self, dims: int, seed: int = 0):
        self.dims = dims
        self.seed = seed

    def fit(self, x: np.ndarray) -> "Whitening":
        x = np.asarray(x, np.float64)
        n, d = x.shape
        k = min(self.dims, n - 1, d)
        if k < 1:
            raise ValueError(f"PCA needs at least 2 documents to fit on, got {n}")
        if k < self.dims:
            log.info("PCA: %d dims requested, but %d fit documents x %d dims allow at most %d; using %d",
                     self.dims, n, d, min(n - 1, d), k)
        pca = PCA(n_components=k, svd_solver="full", random_state=self.seed).fit(x)
        var = pca.explained_variance_
        keep = var > RANK_TOLERANCE * var.max()
        if not keep.all():
            log.info("PCA: dropped %d of %d components with ~zero variance (rank guard)", int((~keep).sum()), k)
        self.mean_ = pca.mean_
        self.components_ = pca.components_[keep]
        self.scale_ = 1.0 / np.sqrt(var[keep])
        self.explained_variance_ratio_ = pca.explained_variance_ratio_[keep]
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        y = (np.asarray(x, np.float64) - self.mean_) @ self.components_.T * self.scale_
        return power_l2(y).astype(np.float32)


DESCRIPTOR_COLUMNS = ["doc_id", "writer", "split", "descriptor"]


def descriptor_table(doc_ids, index: pd.DataFrame, vectors: np.ndarray) -> pa.Table:
    meta = index.set_index("doc_id").loc[list(doc_ids)]
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).ravel(), pa.float32())
    return pa.table({"doc_id": pa.array(list(doc_ids), pa.string()),
                     "writer": pa.array(meta.writer.tolist(), pa.string()),
                     "split": pa.array(meta.split.tolist(), pa.string()),
                     "descriptor": pa.FixedSizeListArray.from_arrays(flat, dim)})


def read_descriptors(path) -> tuple[pd.DataFrame, np.ndarray]:
    """(doc_id/writer/split table, N x D float32 matrix) from a descriptors.parquet."""
    table = pq.read_table(path)
    column = table.column("descriptor").combine_chunks()
    dim = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
    return table.drop(["descriptor"]).to_pandas(), matrix


def sum_pooled_cls(cls_path, shard_index_path) -> dict[str, np.ndarray]:
    """doc_id -> sum of the page's window [CLS] tokens (zeros for a page without foreground)."""
    shard = read_array_shard(cls_path, shard_index_path, count="n_windows", offset="cls_offset")
    return {d: np.asarray(rows, np.float64).sum(axis=0).astype(np.float32) for d, rows in shard.items()}


def whiten(doc_ids, vectors: np.ndarray, index_path, settings: dict, out_path, info_path) -> pa.Table:
    """Fit whitening on `settings['pca_fit_on']` rows, transform all, write descriptors.parquet."""
    index = pd.read_parquet(index_path)
    split_of = dict(zip(index.doc_id, index.split))
    splits = np.array([split_of[d] for d in doc_ids])
    fit_on = settings["pca_fit_on"]
    info = {"pca_fit_on": fit_on, "n_docs": len(doc_ids), "input_dim": int(vectors.shape[1])}
    if settings["pca_dims"] > 0:
        fit_rows = vectors[splits == fit_on]
        if fit_on == "test":
            log.warning("PCA is fit on the test split (transductive); recorded as pca_fit_on=test")
        model = Whitening(settings["pca_dims"], settings["seed"]).fit(fit_rows)
        out = model.transform(vectors)
        info.update(n_fit=int(len(fit_rows)), pca_dims=int(out.shape[1]),
                    explained_variance=float(model.explained_variance_ratio_.sum()))
        log.info("PCA whitening fit on %d %s documents: %d -> %d dims (%.1f%% variance)", len(fit_rows), fit_on,
                 vectors.shape[1], out.shape[1], 100 * info["explained_variance"])
    else:
        out = power_l2(np.asarray(vectors, np.float32))
        info.update(pca_dims=0)
    table = descriptor_table(doc_ids, index, out)
    write_parquet(table, out_path)
    write_json(info, info_path)
    return table
