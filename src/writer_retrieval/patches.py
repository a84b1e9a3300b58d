"""Patch stage: small binarized patches centred on SIFT keypoints (the SAGHOG / ICDAR23 line).

Keypoints come from `features.detect_keypoints` on the binarized page (ink black on white, angle
0, orientation duplicates removed). Per page, in this order:

1. off ink: the keypoint's pixel (x, y rounded half up, clipped to the page) is background -> rejected;
2. duplicates: keypoints on the same rounded (x, y) collapse to the strongest response (the
   orientation duplicates `detect_keypoints` already removed count here too);
3. background: the `size` x `size` patch centred on (x, y) (cut from the page padded with
   background, so border keypoints give full patches) with a background share > `max_background`
   -> rejected;
4. cap (train pages only): at most `max_per_page` patches, a random subset seeded by (`seed`, a
   stable hash of the page key), kept in the deterministic keypoint order (rounded x, then y).
   The cap bounds the training samples; a test page keeps every patch, as the published SAGHOG
   code embeds them (the cap cost 7-10 mAP points on word pages).

So n_detected = n_off_ink + n_duplicates + n_background + n_capped + n_kept. The keypoint pixel is
patch[size // 2, size // 2]. Patches are stored with ink = 1, background = 0; SIFT descriptors
(uint8, angle 0) are computed on the binarized black-on-white page at the kept keypoints.
"""
from __future__ import annotations

import hashlib
import logging
import time

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from .binarize import shard_rows
from .features import SIFT_DIM, binarized_page, detect_keypoints, sift_detector
from .imaging import read_mask
from .storage import write_npy, write_parquet

log = logging.getLogger("writer_retrieval")

COUNTS = ["n_detected", "n_off_ink", "n_background", "n_duplicates", "n_capped", "n_kept"]


def stable_hash(key: str) -> int:
    """A 64-bit hash of `key` that is the same in every process (unlike Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(str(key).encode("utf-8")).digest()[:8], "little")


def page_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), stable_hash(key)])


def cut_patches(ink: np.ndarray, xy: np.ndarray, size: int) -> np.ndarray:
    """`size` x `size` crops of `ink` with pixel (x, y) at [size // 2, size // 2]; outside the page is background."""
    xy = np.asarray(xy, np.int64).reshape(-1, 2)
    half = size // 2
    padded = np.pad(np.asarray(ink, bool), half, constant_values=False)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size))
    # window (r, c) covers padded rows r..r+size-1 = page rows r-half..; centre row r-half+half = r.
    return windows[xy[:, 1], xy[:, 0]].astype(np.uint8)


def _empty(size: int, counts: dict) -> dict:
    return {"patches": np.zeros((0, size, size), np.uint8), "xy": np.zeros((0, 2), np.int32),
            "descriptors": np.zeros((0, SIFT_DIM), np.uint8), **counts}


def page_patches(ink: np.ndarray, settings: dict, key: str = "", cap: int | None = None) -> dict:
    """Patches, keypoint centres and SIFT descriptors of one binarized page (ink = True); see the module doc.

    Returns a dict: patches uint8 [N, size, size] (ink 1, background 0), xy int32 [N, 2], descriptors
    uint8 [N, 128], and the counts n_detected, n_off_ink, n_duplicates, n_background, n_capped, n_kept.
    `key` (e.g. the doc_id) seeds the per-page cap together with settings["seed"]; `cap` (default
    settings["max_per_page"]; 0 = none) is the most patches kept.
    """
    ink = np.asarray(ink, bool)
    size = int(settings["size"])
    h, w = ink.shape
    keypoints, n_detected = detect_keypoints(ink, settings)
    counts = dict.fromkeys(COUNTS, 0)
    counts["n_detected"] = n_detected
    counts["n_duplicates"] = n_detected - len(keypoints)  # orientation duplicates
    if not keypoints:
        return _empty(size, counts)

    pts = np.array([kp.pt for kp in keypoints], np.float64)
    response = np.array([kp.response for kp in keypoints], np.float64)
    xy = np.floor(pts + 0.5).astype(np.int64)
    xy[:, 0] = np.clip(xy[:, 0], 0, w - 1)
    xy[:, 1] = np.clip(xy[:, 1], 0, h - 1)

    on_ink = ink[xy[:, 1], xy[:, 0]]
    counts["n_off_ink"] = int((~on_ink).sum())
    candidates = np.flatnonzero(on_ink)

    # Strongest response per rounded (x, y); ties keep the first in keypoint order. Output sorted by (x, y).
    order = candidates[np.lexsort((-response[candidates], xy[candidates, 1], xy[candidates, 0]))]
    if len(order):
        first = np.ones(len(order), bool)
        first[1:] = np.any(xy[order[1:]] != xy[order[:-1]], axis=1)
        unique = order[first]
    else:
        unique = order
    counts["n_duplicates"] += len(candidates) - len(unique)

    patches = cut_patches(ink, xy[unique], size)
    background = 1.0 - patches.reshape(len(unique), -1).mean(axis=1) if len(unique) else np.zeros(0)
    full_enough = background <= float(settings["max_background"])
    counts["n_background"] = int((~full_enough).sum())
    unique, patches = unique[full_enough], patches[full_enough]

    cap = int(settings["max_per_page"] if cap is None else cap)
    if cap > 0 and len(unique) > cap:
        chosen = np.sort(page_rng(settings["seed"], key).choice(len(unique), size=cap, replace=False))
        counts["n_capped"] = len(unique) - cap
        unique, patches = unique[chosen], patches[chosen]
    counts["n_kept"] = len(unique)
    if not len(unique):
        return _empty(size, counts)

    kept = [keypoints[i] for i in unique]
    for kp in kept:
        kp.angle = 0.0
    described, desc = sift_detector(settings).compute(binarized_page(ink), kept)
    if desc is None or len(described) != len(kept):
        raise RuntimeError(f"SIFT described {0 if desc is None else len(described)} of {len(kept)} keypoints")
    return {"patches": np.ascontiguousarray(patches), "xy": xy[unique].astype(np.int32),
            "descriptors": np.clip(np.round(desc), 0, 255).astype(np.uint8), **counts}


def extract_shard(index_path, masks_table, shard: int, shard_size: int, settings: dict, patches_path,
                  descriptors_path, shard_index_path, stats_path) -> pd.DataFrame:
    """Patches of one shard of the index: patches .npy [N, size, size] uint8, descriptors .npy [N, 128]
    uint8, a Parquet index with one row per patch (doc_id, x, y; row i = row i of the arrays), and
    counts per page (doc_id, writer, split, n_detected, n_off_ink, n_background, n_duplicates,
    n_capped, n_kept, seconds). Returns the stats table."""
    index = pd.read_parquet(index_path)
    rows = shard_rows(index, shard, shard_size)
    mask_of = dict(pd.read_parquet(masks_table, columns=["doc_id", "mask_path"]).itertuples(index=False))
    size = int(settings["size"])
    patch_parts, desc_parts, xy_parts, docs, stats = [], [], [], [], []
    for doc in tqdm(rows.itertuples(index=False), total=len(rows), desc=f"patches shard {shard}", unit="page",
                    mininterval=2):
        start = time.perf_counter()
        mask_path = mask_of[doc.doc_id]
        cap = settings["max_per_page"] if doc.split == "train" else 0  # test pages: every patch
        result = page_patches(read_mask(mask_path), settings, key=doc.doc_id, cap=cap)
        n = result["n_kept"]
        patch_parts.append(result["patches"])
        desc_parts.append(result["descriptors"])
        xy_parts.append(result["xy"])
        docs.extend([doc.doc_id] * n)
        stats.append({"doc_id": doc.doc_id, "writer": doc.writer, "split": doc.split,
                      **{c: int(result[c]) for c in COUNTS}, "seconds": time.perf_counter() - start})
        if n == 0:
            log.warning("%s: no patch kept (%d keypoints detected on the binarized page %s)", doc.path,
                        result["n_detected"], mask_path)
    patches = np.concatenate(patch_parts) if patch_parts else np.zeros((0, size, size), np.uint8)
    descriptors = np.concatenate(desc_parts) if desc_parts else np.zeros((0, SIFT_DIM), np.uint8)
    xy = np.concatenate(xy_parts) if xy_parts else np.zeros((0, 2), np.int32)
    write_npy(patches, patches_path)
    write_npy(descriptors, descriptors_path)
    write_parquet(pd.DataFrame({"doc_id": pd.Series(docs, dtype=object), "x": xy[:, 0].astype(np.int32),
                                "y": xy[:, 1].astype(np.int32)}), shard_index_path)
    table = pd.DataFrame(stats, columns=["doc_id", "writer", "split", *COUNTS, "seconds"])
    write_parquet(table, stats_path)
    log.info("shard %d: %d patches from %d pages", shard, len(patches), len(rows))
    return table


def load_patches(patches_path, shard_index_path, mmap: bool = True) -> tuple[pd.DataFrame, np.ndarray]:
    """(per-patch index doc_id, x, y; the [N, size, size] uint8 patch array, memory-mapped by default)."""
    index = pd.read_parquet(shard_index_path)
    patches = np.load(patches_path, mmap_mode="r" if mmap else None)
    if len(index) != len(patches):
        raise ValueError(f"{shard_index_path} has {len(index)} rows but {patches_path} {len(patches)} patches")
    return index, patches
