"""Patch-embedding stage (SAGHOG): one descriptor per page, the signed-power + L2 normalised sum
of the encodings of its patches (the patch encoder comes from finetune.patch_encoder).

Separate from the ViT window embedding (embed.py) so that each depends only on its own network's
code: this stage's code version covers the SAGHOG encoder and fine-tuning, the other's does not.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
from tqdm import tqdm

from .binarize import shard_rows
from .normalise import power_l2
from .storage import write_npy, write_parquet

log = logging.getLogger("writer_retrieval")


def embed_patches_shard(patches_path, shard_index_path, encode, batch_size: int, power: float, out_vectors,
                        out_index, out_stats, index_path, shard: int, shard_size: int) -> pd.DataFrame:
    """One vector per page of a shard of the dataset index: the sum of the page's patch encodings
    (`encode`: uint8 patches [n, H, W] -> float32 [n, F]) -> signed power -> L2.

    The pages come from the dataset index (`shard_rows(index, shard, shard_size)`), their patches
    from the patch stage's shard (patches .npy + per-patch index with doc_id); a page without
    patches gets a zero row and a warning. Writes out_vectors .npy float32 [n_docs, F] (index order),
    out_index (doc_id, n_patches) and out_stats (doc_id, writer, split, n_patches, seconds); returns the stats.
    """
    rows = shard_rows(pd.read_parquet(index_path), shard, shard_size)
    docs = [str(d) for d in rows.doc_id]
    patches = np.load(patches_path, mmap_mode="r")
    positions = patch_positions(patches, patches_path, shard_index_path, docs, f"shard {shard} of {index_path}")
    width = encoding_width(encode, patches)
    writers, splits = rows.writer.tolist(), rows.split.tolist()
    vectors = np.zeros((len(docs), width), np.float32)
    stats = []
    for i, doc in enumerate(tqdm(docs, desc=f"embed patches shard {shard}", unit="page", mininterval=2)):
        start = time.perf_counter()
        where = np.sort(np.asarray(positions.get(doc, []), np.int64))
        if len(where) == 0:
            log.warning("%s: no patches; its descriptor is a zero vector", doc)
        else:
            vectors[i] = power_l2(summed_encoding(patches, where, encode, batch_size, width)[None], power)[0]
        stats.append({"doc_id": doc, "writer": writers[i], "split": splits[i], "n_patches": int(len(where)),
                      "seconds": time.perf_counter() - start})
    write_npy(vectors, out_vectors)
    table = pd.DataFrame(stats, columns=["doc_id", "writer", "split", "n_patches", "seconds"])
    write_parquet(table[["doc_id", "n_patches"]], out_index)
    write_parquet(table, out_stats)
    return table


def patch_positions(patches: np.ndarray, patches_path, shard_index_path, docs: list[str], shard_name: str) -> dict:
    """doc_id -> row numbers of its patches in the patch shard; an error where the per-patch index
    does not fit the patches or names a document outside this shard of the dataset index."""
    patch_docs = pd.read_parquet(shard_index_path, columns=["doc_id"]).doc_id.astype(str)
    if len(patch_docs) != len(patches):
        raise ValueError(f"{shard_index_path} has {len(patch_docs)} rows but {patches_path} {len(patches)} patches")
    positions = patch_docs.groupby(patch_docs, sort=False).indices
    strangers = sorted(set(positions) - set(docs))
    if strangers:
        raise ValueError(f"{shard_index_path}: patches of {len(strangers)} document(s) not in {shard_name}, "
                         f"e.g. {strangers[0]!r} (patch and index shards do not match)")
    return positions


def encoding_width(encode, patches: np.ndarray) -> int:
    """`encode.dim`, or else the width of the encoding of one blank patch."""
    width = getattr(encode, "dim", None)
    if width is None:
        width = np.asarray(encode(np.zeros((1, *patches.shape[1:]), np.uint8))).shape[1]
    return int(width)


def summed_encoding(patches: np.ndarray, where: np.ndarray, encode, batch_size: int, width: int) -> np.ndarray:
    """Sum (float64) of the encodings of the patches at rows `where`, encoded `batch_size` at a time."""
    batch_size = max(int(batch_size), 1)
    total = np.zeros(width, np.float64)
    for b in range(0, len(where), batch_size):
        total += np.asarray(encode(np.asarray(patches[where[b:b + batch_size]])), np.float64).sum(axis=0)
    return total
