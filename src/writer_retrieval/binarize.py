"""Binarization stage: Otsu and Sauvola ink masks (ink = True), per-page stats, DIBCO-style quality.

Masks are stored as 1-bit PNG with ink = 1 (see imaging.write_mask). Work is split into shards
of the index (one job per shard) and the shard tables are merged afterwards.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from skimage.filters import threshold_otsu, threshold_sauvola
from tqdm import tqdm

from .imaging import load_gray, read_mask, write_mask
from .storage import write_parquet

log = logging.getLogger("writer_retrieval")

SHARD_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("writer", pa.string()), ("split", pa.string()), ("mask_path", pa.string()),
    ("method", pa.string()), ("ink_ratio", pa.float64()), ("threshold_mean", pa.float64()),
    ("seconds", pa.float64()),
    # Quality against ground truth; null where the dataset has none.
    ("f_measure", pa.float64()), ("precision", pa.float64()), ("recall", pa.float64()), ("psnr", pa.float64()),
])
STATS_COLUMNS = ["doc_id", "writer", "split", "mask_path", "method", "ink_ratio", "threshold_mean", "seconds"]
QUALITY_COLUMNS = ["doc_id", "writer", "split", "method", "f_measure", "precision", "recall", "psnr"]


def binarize_page(gray: np.ndarray, settings: dict, region: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Ink mask (True = ink, dark on light paper) and the mean threshold used.

    sam+X methods: the binarizer X's ink inside the page `region` (Segment Anything)."""
    method = settings["method"]
    if method.startswith("sam"):
        if region is None:
            raise ValueError(f"{method} needs the page region from the segment stage")
        ink, threshold = binarize_page(gray, settings["binarizer"])
        return ink & region, threshold
    if method == "otsu":
        t = threshold_otsu(gray)
        return gray <= t, float(t)
    if method == "sauvola":
        t = threshold_sauvola(gray, window_size=settings["window"], k=settings["k"])
        return gray <= t, float(t.mean())
    raise ValueError(f"unknown binarization method {method!r}")


def pixel_quality(pred: np.ndarray, truth: np.ndarray) -> dict:
    """DIBCO pixel measures with ink as the positive class: F-measure, precision, recall, PSNR (C = 1)."""
    if pred.shape != truth.shape:
        raise ValueError(f"mask shape {pred.shape} differs from ground truth {truth.shape}")
    tp = float(np.count_nonzero(pred & truth))
    fp = float(np.count_nonzero(pred & ~truth))
    fn = float(np.count_nonzero(~pred & truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    mse = (fp + fn) / pred.size
    psnr = float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)
    return {"f_measure": f, "precision": precision, "recall": recall, "psnr": psnr}


def shard_rows(index: pd.DataFrame, shard: int, shard_size: int) -> pd.DataFrame:
    """Rows of shard `shard` (index sorted by doc_id, fixed-size slices)."""
    return index.iloc[shard * shard_size:(shard + 1) * shard_size]


def n_shards(n_docs: int, shard_size: int) -> int:
    return max(1, -(-n_docs // shard_size))


def binarize_shard(index_path, shard: int, shard_size: int, settings: dict, masks_dir, out_path,
                   regions_dir=None) -> pd.DataFrame:
    """Binarize one shard of the index; write masks and the shard's table (regions: sam+X methods)."""
    index = pd.read_parquet(index_path)
    rows = shard_rows(index, shard, shard_size)
    masks_dir = Path(masks_dir)
    records = []
    for doc in tqdm(rows.itertuples(index=False), total=len(rows), desc=f"binarize {settings['method']} shard {shard}",
                    unit="page", mininterval=2):
        start = time.perf_counter()
        gray = load_gray(doc.path)
        region = read_mask(Path(regions_dir) / f"{doc.doc_id}.png") if regions_dir else None
        mask, threshold = binarize_page(gray, settings, region)
        mask_path = masks_dir / f"{doc.doc_id}.png"
        write_mask(mask_path, mask)
        rec = {"doc_id": doc.doc_id, "writer": doc.writer, "split": doc.split, "mask_path": str(mask_path),
               "method": settings["method"], "ink_ratio": float(mask.mean()), "threshold_mean": threshold,
               "seconds": time.perf_counter() - start,
               "f_measure": None, "precision": None, "recall": None, "psnr": None}
        if isinstance(doc.ground_truth, str) and doc.ground_truth:
            rec.update(pixel_quality(mask, read_mask(doc.ground_truth)))
        records.append(rec)
    table = pd.DataFrame(records, columns=SHARD_SCHEMA.names)
    write_parquet(table, out_path, SHARD_SCHEMA)
    return table


def merge_shards(shard_paths, stats_path, quality_path) -> pd.DataFrame:
    """Concatenate the shard tables into stats.parquet and quality.parquet."""
    table = pd.concat([pd.read_parquet(p) for p in shard_paths], ignore_index=True)
    write_parquet(table[STATS_COLUMNS], stats_path)
    quality = table.dropna(subset=["f_measure"])[QUALITY_COLUMNS]
    write_parquet(quality, quality_path)
    method = table["method"].iloc[0] if len(table) else "?"
    log.info("%s: %d pages, mean ink ratio %.4f, %.3f s/page", method, len(table),
             table["ink_ratio"].mean(), table["seconds"].mean())
    if len(quality):
        log.info("%s vs ground truth on %d pages: F-measure %.4f, PSNR %.2f dB", method, len(quality),
                 quality["f_measure"].mean(), quality["psnr"].mean())
    else:
        log.info("no ground-truth ink masks in this dataset: quality.parquet is empty")
    return table


def summarize_quality(quality_paths, variants, out_path) -> pd.DataFrame:
    """One row per binarizer: mean pixel quality over the pages with ground truth."""
    rows = []
    for path, variant in zip(quality_paths, variants):
        q = pd.read_parquet(path)
        if len(q):
            rows.append({"variant": variant, "method": q["method"].iloc[0], "n_pages": len(q),
                         "f_measure": q["f_measure"].mean(), "precision": q["precision"].mean(),
                         "recall": q["recall"].mean(), "psnr": q["psnr"].mean()})
    summary = pd.DataFrame(rows, columns=["variant", "method", "n_pages", "f_measure", "precision", "recall", "psnr"])
    write_parquet(summary, out_path)
    if len(summary):
        log.info("binarization quality:\n%s", summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return summary
