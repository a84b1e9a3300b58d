"""Atomic writes of tables and settings: a killed job never leaves a half-written file."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


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
def write_array_shard(arrays: dict[str, np.ndarray], npy_path, index_path, dtype, width: int) -> pd.DataFrame:
    docs = list(arrays)
    counts = [len(arrays[d]) for d in docs]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if docs else np.zeros(0, np.int64)
    stacked = (np.concatenate([np.asarray(arrays[d], dtype=dtype).reshape(-1, width) for d in docs])
               if docs else np.zeros((0, width), dtype))
    write_npy(stacked, npy_path)
    index = pd.DataFrame({"doc_id": docs, "count": np.asarray(counts, np.int64), "offset": offsets})
    if index_path is not None:
        write_parquet(index, index_path)
    return index


def read_array_shard(npy_path, index_path, mmap: bool = True) -> dict[str, np.ndarray]:
    """doc_id -> rows of that document (memory-mapped views by default)."""
    stacked = np.load(npy_path, mmap_mode="r" if mmap else None)
    index = pd.read_parquet(index_path)
    return {d: stacked[o:o + c] for d, c, o in zip(index.doc_id, index["count"], index.offset)}
