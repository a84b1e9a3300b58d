"""VLAD stage: k-means codebook on a seeded sample of train-split local descriptors, and encoding.

Encoding is vectorised and bounded in memory: descriptors are assigned in chunks of
`chunk_size` rows and residual sums are accumulated as (one-hot assignment)^T x descriptors
minus count x centroid, so no N x C x D residual tensor is ever formed.
"""
from __future__ import annotations

import logging

import faiss
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from .normalise import power_l2
from .storage import read_array_shard, write_json, write_npy, write_parquet

log = logging.getLogger("writer_retrieval")


def sample_descriptors(shards, doc_split: dict[str, str], split: str, sample_size: int, seed: int,
                       load) -> np.ndarray:
    """A seeded uniform sample (without replacement) of the local descriptors of `split` documents.

    `shards` is a list of shard handles, `load(handle)` returns {doc_id: descriptors}. Two passes:
    count, then draw row numbers and gather them, so memory is bounded by the sample size.
    """
    counts = []
    for handle in shards:
        for doc, desc in load(handle).items():
            if doc_split.get(doc) == split:
                counts.append(len(desc))
    total = int(sum(counts))
    if total == 0:
        raise ValueError(f"no local descriptors in the {split} split to fit a codebook on")
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(total, size=min(sample_size, total), replace=False))
    parts, start = [], 0
    for handle in shards:
        for doc, desc in load(handle).items():
            if doc_split.get(doc) != split:
                continue
            stop = start + len(desc)
            lo, hi = np.searchsorted(take, [start, stop])
            if hi > lo:
                parts.append(np.asarray(desc[take[lo:hi] - start], np.float32))
            start = stop
    sample = np.concatenate(parts)
    log.info("codebook sample: %d of %d %s descriptors (seed %d)", len(sample), total, split, seed)
    return sample


def fit_codebook(sample: np.ndarray, n_clusters: int, iterations: int, seed: int) -> np.ndarray:
    """k-means centroids (faiss), C x D float32."""
    n, d = sample.shape
    if n < n_clusters:
        raise ValueError(f"codebook of {n_clusters} centroids needs at least as many descriptors; got {n}")
    kmeans = faiss.Kmeans(d, n_clusters, niter=iterations, seed=seed, verbose=False,
                          max_points_per_centroid=max(256, -(-n // n_clusters)))
    kmeans.train(np.ascontiguousarray(sample, np.float32))
    return np.asarray(kmeans.centroids, np.float32).reshape(n_clusters, d)


def assign(descriptors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (exact L2, faiss) of every descriptor."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    _, nearest = index.search(np.ascontiguousarray(descriptors, np.float32), 1)
    return nearest[:, 0]


def residual_sums(descriptors: np.ndarray, centroids: np.ndarray, chunk_size: int = 65536) -> np.ndarray:
    """Per-centroid sums of residuals (x - c_a(x)) with hard assignment; C x D float64."""
    c, d = centroids.shape
    sums = np.zeros((c, d), np.float64)
    counts = np.zeros(c, np.int64)
    for start in range(0, len(descriptors), chunk_size):
        chunk = np.asarray(descriptors[start:start + chunk_size], np.float32)
        nearest = assign(chunk, centroids)
        onehot = sp.csr_matrix((np.ones(len(chunk), np.float32), (nearest, np.arange(len(chunk)))), shape=(c, len(chunk)))
        sums += onehot @ chunk.astype(np.float64)
        counts += np.bincount(nearest, minlength=c)
    return sums - counts[:, None] * centroids.astype(np.float64)


def normalise(vlad: np.ndarray, intra: bool, power: float) -> np.ndarray:
    """Intra-normalisation (per centroid L2), signed power normalisation, global L2; returns a flat vector."""
    v = np.asarray(vlad, np.float64)
    if intra:
        v = power_l2(v, axis=1)
    return power_l2(v.ravel(), power, axis=None).astype(np.float32)


def encode(descriptors: np.ndarray, centroids: np.ndarray, settings: dict) -> np.ndarray:
    return normalise(residual_sums(descriptors, centroids, settings["chunk_size"]), settings["intra_norm"],
                     settings["power"])


def build_codebook(shard_handles, index_path, settings: dict, load, codebook_path, info_path) -> np.ndarray:
    index = pd.read_parquet(index_path, columns=["doc_id", "split"])
    sample = sample_descriptors(shard_handles, dict(zip(index.doc_id, index.split)), "train",
                                settings["codebook_sample"], settings["seed"], load)
    centroids = fit_codebook(sample, settings["codebook_size"], settings["kmeans_iterations"], settings["seed"])
    write_npy(centroids, codebook_path)
    write_json({"n_sample": len(sample), "codebook_size": len(centroids), "dim": int(centroids.shape[1]),
                **settings}, info_path)
    log.info("codebook: %d centroids x %d dims", *centroids.shape)
    return centroids


def encode_shard(descriptors_by_doc: dict[str, np.ndarray], codebook_path, settings: dict, out_npy, out_index):
    """VLAD vectors of one shard's documents (rows in the order of the shard's doc ids)."""
    centroids = np.load(codebook_path)
    docs = list(descriptors_by_doc)
    vectors = np.zeros((len(docs), centroids.size), np.float32)
    for i, doc in enumerate(tqdm(docs, desc="vlad", unit="doc", mininterval=2)):
        vectors[i] = encode(descriptors_by_doc[doc], centroids, settings)
    write_npy(vectors, out_npy)
    write_parquet(pd.DataFrame({"doc_id": docs}), out_index)
    return vectors


def load_tokens(tokens_path, shard_index_path) -> dict[str, np.ndarray]:
    """doc_id -> foreground patch tokens (float32) of one shard (embed.write_token_shard)."""
    shard = read_array_shard(tokens_path, shard_index_path, count="n_tokens")
    return {d: np.asarray(rows, np.float32) for d, rows in shard.items()}
