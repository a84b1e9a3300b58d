"""Feature stage: local descriptors per page.

`sift`: SIFT keypoints detected on the binarized page (ink black on white), orientation fixed to
0 (writing has a canonical orientation; rotation invariance only blurs the writer's slant), the
duplicate keypoints that multiple orientations produce removed, descriptors computed on the gray
page (or the binarized one), stored as raw uint8 SIFT and Hellinger-normalised (RootSIFT) on load.
"""
from __future__ import annotations

import logging
import time

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from .binarize import shard_rows
from .imaging import load_gray, read_mask
from .storage import read_array_shard, write_array_shard, write_parquet

log = logging.getLogger("writer_retrieval")

SIFT_DIM = 128


def sift_detector(settings: dict) -> cv2.SIFT:
    """A SIFT object from the stage settings (`max_keypoints` optional: 0 or absent = no cap)."""
    return cv2.SIFT_create(nfeatures=int(settings.get("max_keypoints", 0)), nOctaveLayers=settings["octave_layers"],
                           contrastThreshold=settings["contrast_threshold"],
                           edgeThreshold=settings["edge_threshold"], sigma=settings["sigma"])


def binarized_page(ink: np.ndarray) -> np.ndarray:
    """The ink mask rendered as a page: ink black (0) on white (255), uint8."""
    return np.where(ink, 0, 255).astype(np.uint8)


def detect_keypoints(ink: np.ndarray, settings: dict) -> tuple[list[cv2.KeyPoint], int]:
    """SIFT keypoints of the binarized page (ink black on white), orientation forced to 0.

    The duplicates that multiple orientations produce (same x, y, size to 0.01 px) collapse to the
    strongest response; keypoints come in a deterministic order (sorted by rounded x, y, size).
    Returns the keypoints and the raw detected count (before removing duplicates).
    """
    detected = sift_detector(settings).detect(binarized_page(ink), None)
    unique: dict[tuple, cv2.KeyPoint] = {}
    for kp in detected:
        key = (round(kp.pt[0], 2), round(kp.pt[1], 2), round(kp.size, 2))
        if key not in unique or kp.response > unique[key].response:
            unique[key] = kp
    keypoints = []
    for key in sorted(unique):  # deterministic order
        kp = unique[key]
        kp.angle = 0.0
        keypoints.append(kp)
    return keypoints, len(detected)


def sift_page(gray: np.ndarray, ink: np.ndarray, settings: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """Keypoints (x, y, size, response) and raw uint8 descriptors of one page; also the raw keypoint count."""
    keypoints, n_detected = detect_keypoints(ink, settings)
    if not keypoints:
        return np.zeros((0, 4), np.float32), np.zeros((0, SIFT_DIM), np.uint8), n_detected
    source = gray if settings["describe_on"] == "gray" else binarized_page(ink)
    keypoints, desc = sift_detector(settings).compute(source, keypoints)
    if desc is None:
        return np.zeros((0, 4), np.float32), np.zeros((0, SIFT_DIM), np.uint8), n_detected
    coords = np.array([(k.pt[0], k.pt[1], k.size, k.response) for k in keypoints], np.float32)
    return coords, np.clip(np.round(desc), 0, 255).astype(np.uint8), n_detected


def root_sift(desc: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Hellinger normalisation: L1-normalise, element-wise square root (rows then have unit L2 norm)."""
    d = np.asarray(desc, np.float32)
    return np.sqrt(d / (d.sum(axis=1, keepdims=True) + eps))


def extract_shard(index_path, masks_table, shard: int, shard_size: int, settings: dict,
                  npy_path, keypoints_path, shard_index_path, stats_path) -> pd.DataFrame:
    """SIFT for one shard of the index: raw descriptors and keypoints (x, y, size, response) into
    array shards sharing one Parquet index, counts per page into a stats table."""
    index = pd.read_parquet(index_path)
    rows = shard_rows(index, shard, shard_size)
    mask_of = dict(pd.read_parquet(masks_table, columns=["doc_id", "mask_path"]).itertuples(index=False))
    arrays, keypoint_arrays, stats = {}, {}, []
    for doc in tqdm(rows.itertuples(index=False), total=len(rows), desc=f"sift shard {shard}", unit="page",
                    mininterval=2):
        start = time.perf_counter()
        coords, desc, n_detected = sift_page(load_gray(doc.path), read_mask(mask_of[doc.doc_id]), settings)
        arrays[doc.doc_id] = desc
        keypoint_arrays[doc.doc_id] = coords
        stats.append({"doc_id": doc.doc_id, "writer": doc.writer, "split": doc.split,
                      "n_keypoints_detected": n_detected, "n_keypoints": len(coords), "n_descriptors": len(desc),
                      "seconds": time.perf_counter() - start})
        if len(desc) == 0:
            log.warning("%s: no SIFT keypoints on the binarized page (its descriptor will be all zeros)", doc.path)
    write_array_shard(arrays, npy_path, shard_index_path, np.uint8, SIFT_DIM)
    write_array_shard(keypoint_arrays, keypoints_path, None, np.float32, 4)
    table = pd.DataFrame(stats)
    write_parquet(table, stats_path)
    return table


def load_descriptors(npy_path, shard_index_path) -> dict[str, np.ndarray]:
    """doc_id -> RootSIFT descriptors (float32) of one shard."""
    return {d: root_sift(a) for d, a in read_array_shard(npy_path, shard_index_path).items()}
