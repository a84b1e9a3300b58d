"""Files that pass between stages: atomic writes of tables, arrays and settings (a killed job never
leaves a half-written file) and the readers of the array formats."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_parquet(table: pd.DataFrame | pa.Table, path: str | os.PathLike, schema: pa.Schema | None = None) -> None:
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, schema=schema, preserve_index=False)
    with atomic_path(path, ".parquet") as tmp:
        pq.write_table(table, tmp)


def write_json(obj, path: str | os.PathLike) -> None:
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array)


# Variable-length per-document arrays (local descriptors, tokens): one .npy of stacked rows per
# shard plus a Parquet index (doc_id, count, offset) saying which rows belong to which document.
# The count and offset columns may have other names, so that two arrays can share one index
# (the embedding stage's tokens and [CLS] rows).
def write_array_shard(arrays: dict[str, np.ndarray], npy_path, index_path, dtype, width: int,
                      count: str = "count", offset: str = "offset") -> pd.DataFrame:
    docs = list(arrays)
    counts = [len(arrays[d]) for d in docs]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if docs else np.zeros(0, np.int64)
    stacked = (np.concatenate([np.asarray(arrays[d], dtype=dtype).reshape(-1, width) for d in docs])
               if docs else np.zeros((0, width), dtype))
    write_npy(stacked, npy_path)
    index = pd.DataFrame({"doc_id": docs, count: np.asarray(counts, np.int64), offset: offsets})
    if index_path is not None:
        write_parquet(index, index_path)
    return index


def read_array_shard(npy_path, index_path, mmap: bool = True, count: str = "count",
                     offset: str = "offset") -> dict[str, np.ndarray]:
    """doc_id -> rows of that document (memory-mapped views by default)."""
    stacked = np.load(npy_path, mmap_mode="r" if mmap else None)
    index = pd.read_parquet(index_path)
    return {d: stacked[o:o + c] for d, c, o in zip(index.doc_id, index[count], index[offset])}


# Reranked descriptors (.npz), written by the rerank stage and scored by the retrieval stage:
# dense rows (kRNN), scipy.sparse rows (GNN) or sparse + low-rank rows T + U V^T (SGR).
def write_reranked(path, doc_ids: np.ndarray, rows) -> None:
    import scipy.sparse as sp  # here, not at the top: every stage imports this module

    with atomic_path(path, ".npz") as tmp:
        if hasattr(rows, "u"):  # lowrank.SparseLowRank, recognised by its parts
            t = rows.t
            np.savez(tmp, doc_ids=doc_ids, data=t.data, indices=t.indices, indptr=t.indptr, shape=np.array(t.shape),
                     u=rows.u, v=rows.v)
        elif sp.issparse(rows):
            m = sp.csr_matrix(rows, dtype=np.float32)
            np.savez(tmp, doc_ids=doc_ids, data=m.data, indices=m.indices, indptr=m.indptr, shape=np.array(m.shape))
        else:
            np.savez(tmp, doc_ids=doc_ids, dense=np.asarray(rows, np.float32))


def read_reranked(path, low_rank):
    """(doc_ids, rows): rows dense (N x D), scipy.sparse (N x N), or `low_rank(t, u, v)` for a
    sparse + low-rank file (the caller passes lowrank.SparseLowRank: no numerics in this module)."""
    import scipy.sparse as sp

    with np.load(path) as f:
        if "dense" in f:
            return f["doc_ids"], f["dense"]
        t = sp.csr_matrix((f["data"], f["indices"], f["indptr"]), shape=tuple(f["shape"]))
        if "u" in f:
            return f["doc_ids"], low_rank(t, f["u"], f["v"])
        return f["doc_ids"], t


def merge_stats(stats_paths, out_path) -> pd.DataFrame:
    """Concatenate a sharded stage's per-shard stats tables (SIFT, patch, window or token counts)."""
    table = pd.concat([pd.read_parquet(p) for p in stats_paths], ignore_index=True)
    write_parquet(table, out_path)
    counts = [c for c in table.columns if c.startswith("n_")]
    per_split = table.groupby("split")[counts].agg(["mean", "min", "max"])
    log.info("%d pages (%.2f s/page):\n%s", len(table), table.seconds.mean(), per_split.to_string())
    return table
