"""Cluster stage: pseudo labels for the patches (SAGHOG / ICDAR23 line).

SIFT descriptors of the patches -> Hellinger (`features.root_sift`) -> PCA whitening to `pca_dims`
(sklearn PCA, whiten) -> faiss k-means with `clusters` centroids (`vlad.fit_codebook`), both fit
on one seeded sample of at most `sample` TRAIN-split descriptors -> every patch of every split is
assigned to its nearest centroid; a patch whose ratio sqrt(d_nearest) / sqrt(d_second) exceeds
`ratio` lies between two clusters and is labelled -1 (ambiguous, dropped from training).

Outputs: patches.parquet (doc_id, x, y, split, shard, row, cluster, ratio; one row per patch of
every shard, in shard then row order), stats.parquet (cluster, size_train, size_all; ambiguous
patches not counted), a summary JSON and a contact sheet PNG (a few clusters, 12 train patches each).
Deterministic for a fixed seed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import cv2
import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.decomposition import PCA

from .errors import InputError
from .features import SIFT_DIM, root_sift
from .storage import atomic_path, write_json, write_parquet
from .vlad import fit_codebook

log = logging.getLogger("writer_retrieval")

CHUNK = 65536
# Faiss asks for at least this many training points per centroid (it warns below).
MIN_POINTS_PER_CENTROID = 39
# Whitening would divide by ~0 for components with less variance than this share of the largest.
RANK_TOLERANCE = 1e-6

# Contact sheet layout.
SHEET_ROWS = 8
SHEET_PER_ROW = 12
SHEET_ZOOM = 2
SHEET_GAP = 2
SHEET_LABEL_WIDTH = 56
SHEET_GAP_GRAY = 160

LABEL_SCHEMA = pa.schema([("doc_id", pa.string()), ("x", pa.int32()), ("y", pa.int32()), ("split", pa.string()),
                          ("shard", pa.int32()), ("row", pa.int64()), ("cluster", pa.int32()),
                          ("ratio", pa.float32())])


@dataclass
class ClusterModel:
    """Hellinger -> whitening (x - mean) W^T * scale -> centroids in the whitened space."""
    mean: np.ndarray        # [128]
    components: np.ndarray  # [k, 128]
    scale: np.ndarray       # [k]: 1 / sqrt(explained variance)
    centroids: np.ndarray   # [clusters, k]
    explained_variance_ratio: float

    def project(self, descriptors: np.ndarray) -> np.ndarray:
        """Raw uint8 SIFT rows -> whitened float32 rows."""
        x = root_sift(descriptors)
        return np.ascontiguousarray(((x - self.mean) @ self.components.T) * self.scale, np.float32)


def patch_table(shard_index_paths, index_path) -> pd.DataFrame:
    """One row per patch of every shard: doc_id, x, y, split (from the dataset index), shard, row."""
    parts = []
    for shard, path in enumerate(shard_index_paths):
        t = pd.read_parquet(path, columns=["doc_id", "x", "y"])
        t["shard"] = np.int32(shard)
        t["row"] = np.arange(len(t), dtype=np.int64)
        parts.append(t)
    table = (pd.concat(parts, ignore_index=True) if parts
             else pd.DataFrame({"doc_id": [], "x": [], "y": [], "shard": [], "row": []}))
    index = pd.read_parquet(index_path, columns=["doc_id", "split"])
    table["split"] = table.doc_id.map(dict(zip(index.doc_id, index.split)))
    missing = table.doc_id[table.split.isna()].unique()
    if len(missing):
        raise InputError(f"{len(missing)} documents of the patch shards are not in {index_path}, "
                         f"e.g. {missing[:3].tolist()}")
    return table[["doc_id", "x", "y", "split", "shard", "row"]].astype(
        {"x": np.int32, "y": np.int32, "shard": np.int32, "row": np.int64})


def sample_train(table: pd.DataFrame, descriptor_paths, sample_size: int, seed: int) -> np.ndarray:
    """Raw uint8 descriptors of a seeded uniform sample (without replacement) of the train patches."""
    train = np.flatnonzero((table.split == "train").to_numpy())
    if len(train) > sample_size:
        rng = np.random.default_rng(seed)
        train = train[np.sort(rng.choice(len(train), size=sample_size, replace=False))]
    shards, rows = table.shard.to_numpy()[train], table.row.to_numpy()[train]
    parts = [np.zeros((0, SIFT_DIM), np.uint8)]
    for shard, path in enumerate(descriptor_paths):
        take = rows[shards == shard]
        if len(take):
            parts.append(np.asarray(np.load(path, mmap_mode="r")[take], np.uint8))
    return np.concatenate(parts)


def fit_clusters(sample: np.ndarray, settings: dict) -> ClusterModel:
    """Hellinger + PCA whitening + faiss k-means on raw uint8 descriptors `sample`."""
    n, clusters, dims = len(sample), int(settings["clusters"]), int(settings["pca_dims"])
    if n < clusters:
        raise InputError(f"k-means with {clusters} clusters needs at least {clusters} train patch descriptors "
                         f"to fit on, got {n}: lower cluster.clusters or extract more patches")
    if not 1 <= dims <= SIFT_DIM:
        raise InputError(f"cluster.pca_dims must be in 1..{SIFT_DIM}, got {dims}")
    if n <= dims:
        raise InputError(f"PCA to {dims} dims needs more than {dims} train patch descriptors, got {n}")
    if n < MIN_POINTS_PER_CENTROID * clusters:
        log.warning("k-means: %d sample descriptors for %d clusters (faiss wants >= %d per cluster, %d)",
                    n, clusters, MIN_POINTS_PER_CENTROID, MIN_POINTS_PER_CENTROID * clusters)
    x = root_sift(sample)
    pca = PCA(n_components=dims, svd_solver="covariance_eigh", random_state=int(settings["seed"])).fit(x)
    var = pca.explained_variance_
    scale = np.where(var > RANK_TOLERANCE * var.max(), 1.0 / np.sqrt(np.maximum(var, 1e-30)), 0.0)
    if (scale == 0).any():
        log.warning("PCA: %d of %d components have ~zero variance; whitening sets them to 0",
                    int((scale == 0).sum()), dims)
    model = ClusterModel(pca.mean_.astype(np.float32), pca.components_.astype(np.float32),
                         scale.astype(np.float32), np.zeros((0, dims), np.float32),
                         float(pca.explained_variance_ratio_.sum()))
    model.centroids = fit_codebook(model.project(sample), clusters, int(settings["iterations"]),
                                   int(settings["seed"]))
    return model


def assign_ratio(x: np.ndarray, centroids: np.ndarray, ratio: float,
                 index: faiss.Index | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row and its ratio sqrt(d_nearest) / sqrt(d_second) (exact L2).

    Returns (labels int32, with -1 where the ratio exceeds `ratio`; ratios float32). A row at equal
    distance from two centroids has ratio 1; with a single centroid every ratio is 0.
    """
    centroids = np.ascontiguousarray(centroids, np.float32)
    if index is None:
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
    k = min(2, index.ntotal)
    dist, nearest = index.search(np.ascontiguousarray(x, np.float32), k)
    if k == 1:
        return nearest[:, 0].astype(np.int32), np.zeros(len(x), np.float32)
    d = np.sqrt(np.maximum(dist.astype(np.float64), 0.0))
    r = np.divide(d[:, 0], d[:, 1], out=np.ones(len(x)), where=d[:, 1] > 0)
    labels = np.where(r > ratio, -1, nearest[:, 0]).astype(np.int32)
    return labels, r.astype(np.float32)


def label_shards(descriptor_paths, model: ClusterModel, ratio: float, chunk: int = CHUNK):
    """Labels and ratios of all patches of all shards (shard then row order), in chunks."""
    index = faiss.IndexFlatL2(model.centroids.shape[1])
    index.add(np.ascontiguousarray(model.centroids, np.float32))
    labels, ratios = [np.zeros(0, np.int32)], [np.zeros(0, np.float32)]
    for path in descriptor_paths:
        desc = np.load(path, mmap_mode="r")
        for start in range(0, len(desc), chunk):
            lab, r = assign_ratio(model.project(np.asarray(desc[start:start + chunk])), model.centroids, ratio,
                                  index)
            labels.append(lab)
            ratios.append(r)
    return np.concatenate(labels), np.concatenate(ratios)


def cluster_stats(table: pd.DataFrame, n_clusters: int) -> pd.DataFrame:
    """Per cluster: size_train and size_all (patches labelled with it; ambiguous ones excluded)."""
    labels = table.cluster.to_numpy()
    kept = labels >= 0
    train = kept & (table.split == "train").to_numpy()
    return pd.DataFrame({"cluster": np.arange(n_clusters, dtype=np.int32),
                         "size_train": np.bincount(labels[train], minlength=n_clusters).astype(np.int64),
                         "size_all": np.bincount(labels[kept], minlength=n_clusters).astype(np.int64)})


def sheet_height(n_rows: int, size: int) -> int:
    return SHEET_GAP + max(1, n_rows) * (size * SHEET_ZOOM + SHEET_GAP)


def sheet_width(size: int) -> int:
    return SHEET_LABEL_WIDTH + SHEET_PER_ROW * (size * SHEET_ZOOM + SHEET_GAP) + SHEET_GAP


def render_contact_sheet(rows: list[tuple[int, np.ndarray]], size: int) -> np.ndarray:
    """Gray uint8 image: one row per (cluster id, patches [n, size, size], ink 1) with up to
    SHEET_PER_ROW patches magnified SHEET_ZOOM x (nearest neighbour), ink black on white, gray gaps,
    the cluster id written at the left. No rows: one empty row labelled "none"."""
    cell = size * SHEET_ZOOM
    image = np.full((sheet_height(len(rows), size), sheet_width(size)), SHEET_GAP_GRAY, np.uint8)
    image[:, :SHEET_LABEL_WIDTH] = 255
    for r, (cluster, patches) in enumerate(rows or [(None, np.zeros((0, size, size), np.uint8))]):
        top = SHEET_GAP + r * (cell + SHEET_GAP)
        text = "none" if cluster is None else str(cluster)
        cv2.putText(image, text, (4, top + cell // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 0, 1, cv2.LINE_AA)
        for i, patch in enumerate(np.asarray(patches)[:SHEET_PER_ROW]):
            left = SHEET_LABEL_WIDTH + i * (cell + SHEET_GAP)
            tile = np.where(np.asarray(patch) > 0, 0, 255).astype(np.uint8)
            image[top:top + cell, left:left + cell] = np.repeat(np.repeat(tile, SHEET_ZOOM, 0), SHEET_ZOOM, 1)
    return image


def contact_sheet_rows(table: pd.DataFrame, stats: pd.DataFrame, patches_paths, seed: int,
                       n_rows: int = SHEET_ROWS) -> list[tuple[int, np.ndarray]]:
    """A seeded choice of `n_rows` clusters with >= SHEET_PER_ROW train patches (if none has that many:
    among those with any), sorted by id, each with a seeded choice of its train patches."""
    rng = np.random.default_rng(seed)
    eligible = stats.cluster[stats.size_train >= SHEET_PER_ROW].to_numpy()
    if not len(eligible):
        eligible = stats.cluster[stats.size_train > 0].to_numpy()
    chosen = np.sort(rng.choice(eligible, size=min(n_rows, len(eligible)), replace=False))
    train = table[(table.split == "train").to_numpy() & (table.cluster >= 0).to_numpy()]
    arrays = {}
    rows = []
    for cluster in chosen:
        members = train[train.cluster.to_numpy() == cluster]
        pick = np.sort(rng.choice(len(members), size=min(SHEET_PER_ROW, len(members)), replace=False))
        patches = []
        for shard, row in zip(members.shard.to_numpy()[pick], members.row.to_numpy()[pick]):
            if shard not in arrays:
                arrays[shard] = np.load(patches_paths[shard], mmap_mode="r")
            patches.append(np.asarray(arrays[shard][row]))
        rows.append((int(cluster), np.stack(patches)))
    return rows


def write_contact_sheet(image: np.ndarray, path) -> None:
    with atomic_path(path, ".png") as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise OSError(f"OpenCV could not write {path}")


def pseudo_labels(descriptor_paths, shard_index_paths, patches_paths, index_path, settings: dict, labels_path,
                  stats_path, summary_path, contact_sheet_path) -> pd.DataFrame:
    """Cluster the patches' SIFT descriptors (fit on train) and label every patch; see the module doc.

    The three path lists are per patch shard, in the same order (shard i = position i).
    Returns the labels table written to `labels_path`.
    """
    start = time.perf_counter()
    if not len(descriptor_paths) == len(shard_index_paths) == len(patches_paths):
        raise ValueError(f"{len(descriptor_paths)} descriptor, {len(shard_index_paths)} index and "
                         f"{len(patches_paths)} patch shards: they must match")
    table = patch_table(shard_index_paths, index_path)
    seed = int(settings["seed"])
    sample = sample_train(table, descriptor_paths, int(settings["sample"]), seed)
    n_train = int((table.split == "train").sum())
    log.info("cluster: %d patches (%d train); fitting on %d train descriptors (seed %d)", len(table), n_train,
             len(sample), seed)
    model = fit_clusters(sample, settings)
    labels, ratios = label_shards(descriptor_paths, model, float(settings["ratio"]))
    if len(labels) != len(table):
        raise InputError(f"the descriptor shards hold {len(labels)} rows, their indexes {len(table)}")
    table["cluster"] = labels
    table["ratio"] = ratios
    write_parquet(table, labels_path, schema=LABEL_SCHEMA)

    clusters = int(settings["clusters"])
    stats = cluster_stats(table, clusters)
    write_parquet(stats, stats_path)
    size = int(np.load(patches_paths[0], mmap_mode="r").shape[1]) if patches_paths else 32
    write_contact_sheet(render_contact_sheet(contact_sheet_rows(table, stats, patches_paths, seed), size),
                        contact_sheet_path)

    n_ambiguous = int((labels < 0).sum())
    train = (table.split == "train").to_numpy()
    summary = {"n_patches": len(table), "n_train": n_train, "n_fit": len(sample), "n_ambiguous": n_ambiguous,
               "ambiguous_share": n_ambiguous / len(table) if len(table) else 0.0,
               "n_ambiguous_train": int((labels[train] < 0).sum()),
               "n_empty_clusters": int((stats.size_train == 0).sum()),
               "median_cluster_size": float(stats.size_train.median()),
               "pca_explained_variance": model.explained_variance_ratio,
               "seconds": time.perf_counter() - start, "settings": dict(settings)}
    write_json(summary, summary_path)
    log.info("cluster: %d clusters, %d ambiguous patches (%.1f%%), %d clusters without train patches, "
             "median train size %.0f (%.1f s)", clusters, n_ambiguous, 100 * summary["ambiguous_share"],
             summary["n_empty_clusters"], summary["median_cluster_size"], summary["seconds"])
    return table
