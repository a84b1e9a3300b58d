import logging

import cv2
import numpy as np
import pandas as pd
import pytest

from writer_retrieval import patches as patches_mod
from writer_retrieval.storage import merge_stats
from writer_retrieval.imaging import read_mask, write_mask
from writer_retrieval.patches import COUNTS, cut_patches, extract_shard, load_patches, page_patches
from writer_retrieval.synthetic import generate_collection

SETTINGS = {"size": 32, "sigma": 1.6, "contrast_threshold": 0.04, "edge_threshold": 10, "octave_layers": 3,
            "max_background": 0.97, "max_per_page": 0, "seed": 0}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return generate_collection(tmp_path_factory.mktemp("p"), writers=2, pages_per_writer=1, train_writers=1,
                               page_width=400, page_height=500, difficulty=0.3, seed=0, progress=False)


@pytest.fixture(scope="module")
def ink(collection):
    return read_mask(collection.iloc[0].ink_mask)


def hand_page():
    """100 x 120 page: a thick bar, a lone ink pixel, an ink block in the top-left corner."""
    ink = np.zeros((100, 120), bool)
    ink[40:48, 20:81] = True   # stroke
    ink[10, 100] = True        # lone pixel: its patch is almost all background
    ink[0:8, 0:8] = True       # corner block: 64 of 1024 pixels -> 93.75% background
    return ink


def fake_detector(monkeypatch, points):
    """Replace SIFT detection by the given (x, y, response) keypoints (size 4, angle 0)."""
    def detect(ink, settings):
        return [cv2.KeyPoint(float(x), float(y), 4.0, 0.0, float(r)) for x, y, r in points], len(points)
    monkeypatch.setattr(patches_mod, "detect_keypoints", detect)


def test_rules_on_hand_made_keypoints(monkeypatch):
    ink = hand_page()
    fake_detector(monkeypatch, [
        (50, 20, 1.0),                        # off ink
        (50.2, 43.1, 0.5), (49.8, 42.9, 0.9),  # duplicates of (50, 43): the stronger one is kept
        (100, 10, 1.0),                       # on ink, but an almost empty patch
        (1, 1, 1.0),                          # page corner
        (70, 44, 0.3),                        # on the stroke
    ])
    out = page_patches(ink, SETTINGS, key="doc")
    assert {c: out[c] for c in COUNTS} == {"n_detected": 6, "n_off_ink": 1, "n_background": 1,
                                           "n_duplicates": 1, "n_capped": 0, "n_kept": 3}
    assert out["xy"].dtype == np.int32 and out["xy"].tolist() == [[1, 1], [50, 43], [70, 44]]
    assert out["patches"].shape == (3, 32, 32) and out["patches"].dtype == np.uint8
    assert set(np.unique(out["patches"])) <= {0, 1}
    assert out["descriptors"].shape == (3, 128) and out["descriptors"].dtype == np.uint8
    assert out["descriptors"].any(axis=1).all()
    # Patch content equals the page crop, keypoint pixel at [16, 16].
    for (x, y), patch in zip(out["xy"][1:], out["patches"][1:]):
        np.testing.assert_array_equal(patch, ink[y - 16:y + 16, x - 16:x + 16])
        assert patch[16, 16] == 1
    # Border keypoint: full-size patch, outside the page padded with background.
    corner = out["patches"][0]
    assert not corner[:15].any() and not corner[:, :15].any()
    np.testing.assert_array_equal(corner[15:, 15:], ink[:17, :17])


def test_duplicate_keeps_strongest_descriptor(monkeypatch):
    ink = hand_page()
    fake_detector(monkeypatch, [(50.2, 43.1, 0.9), (49.8, 42.9, 0.5)])
    strong_first = page_patches(ink, SETTINGS)
    fake_detector(monkeypatch, [(50.2, 43.1, 0.9)])
    alone = page_patches(ink, SETTINGS)
    assert strong_first["n_kept"] == 1 and strong_first["n_duplicates"] == 1
    np.testing.assert_array_equal(strong_first["descriptors"], alone["descriptors"])


def test_background_threshold_is_a_share(monkeypatch):
    ink = hand_page()
    fake_detector(monkeypatch, [(1, 1, 1.0)])  # 93.75% background
    assert page_patches(ink, {**SETTINGS, "max_background": 0.94})["n_kept"] == 1
    assert page_patches(ink, {**SETTINGS, "max_background": 0.93})["n_background"] == 1


def test_cut_patches_odd_size_and_borders():
    ink = np.arange(25).reshape(5, 5) % 3 == 0
    p = cut_patches(ink, np.array([[0, 0], [4, 4], [2, 3]]), 3)
    assert p.shape == (3, 3, 3)
    np.testing.assert_array_equal(p[2], ink[2:5, 1:4])
    np.testing.assert_array_equal(p[0][1:, 1:], ink[:2, :2])
    assert not p[0][0].any() and not p[0][:, 0].any() and not p[1][2].any() and not p[1][:, 2].any()


def test_real_page_invariants(ink):
    out = page_patches(ink, SETTINGS, key="a")
    n = out["n_kept"]
    assert n > 100
    assert sum(out[c] for c in COUNTS if c != "n_detected") == out["n_detected"]
    assert out["n_off_ink"] > 0 and out["n_duplicates"] > 0
    x, y = out["xy"].T
    assert ink[y, x].all()  # every kept keypoint lies on ink
    assert len({(a, b) for a, b in out["xy"]}) == n  # no duplicate centres
    assert (out["patches"][:, 16, 16] == 1).all()
    assert (1 - out["patches"].reshape(n, -1).mean(axis=1) <= SETTINGS["max_background"]).all()
    np.testing.assert_array_equal(out["patches"], cut_patches(ink, out["xy"], 32))
    assert out["descriptors"].shape == (n, 128)


def test_ring_centre_is_off_ink():
    ring = np.zeros((120, 160), np.uint8)
    cv2.circle(ring, (80, 60), 12, 1, 3)
    out = page_patches(ring.astype(bool), SETTINGS)
    assert out["n_off_ink"] >= 1 and out["n_kept"] >= 1
    x, y = out["xy"].T
    assert ring[y, x].all()


def test_cap_is_seeded_per_page(ink):
    full = page_patches(ink, SETTINGS, key="a")
    a = page_patches(ink, {**SETTINGS, "max_per_page": 50}, key="a")
    again = page_patches(ink, {**SETTINGS, "max_per_page": 50}, key="a")
    other_key = page_patches(ink, {**SETTINGS, "max_per_page": 50}, key="b")
    other_seed = page_patches(ink, {**SETTINGS, "max_per_page": 50, "seed": 1}, key="a")
    assert a["n_kept"] == 50 == len(a["patches"]) == len(a["descriptors"])
    assert a["n_capped"] == full["n_kept"] - 50
    for k in ["xy", "patches", "descriptors"]:
        np.testing.assert_array_equal(a[k], again[k])
    assert not np.array_equal(a["xy"], other_key["xy"]) and not np.array_equal(a["xy"], other_seed["xy"])
    # A subset of the uncapped patches, in the same (deterministic) order.
    position = {tuple(p): i for i, p in enumerate(full["xy"].tolist())}
    picked = [position[tuple(p)] for p in a["xy"].tolist()]
    assert picked == sorted(picked)
    np.testing.assert_array_equal(a["descriptors"], full["descriptors"][picked])
    # A cap above the count keeps everything.
    assert page_patches(ink, {**SETTINGS, "max_per_page": 10**6}, key="a")["n_kept"] == full["n_kept"]


def test_empty_page():
    out = page_patches(np.zeros((64, 64), bool), SETTINGS)
    assert out["n_kept"] == 0 and out["patches"].shape == (0, 32, 32) and out["descriptors"].shape == (0, 128)
    assert out["xy"].shape == (0, 2)


def test_extract_shard_round_trip(collection, tmp_path, caplog):
    index = pd.DataFrame({"doc_id": ["d1", "d2", "d3"], "path": list(collection.path) + ["blank.jpg"],
                          "writer": list(collection.writer) + ["9"], "split": list(collection.split) + ["test"]})
    blank = tmp_path / "blank.png"
    write_mask(blank, np.zeros((200, 200), bool))
    index.to_parquet(tmp_path / "index.parquet")
    pd.DataFrame({"doc_id": ["d1", "d2", "d3"], "mask_path": list(collection.ink_mask) + [str(blank)]}) \
        .to_parquet(tmp_path / "masks.parquet")
    settings = {**SETTINGS, "max_per_page": 300}
    outs = [tmp_path / f"s{i}" for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="writer_retrieval"):
        for shard, out in enumerate(outs):
            extract_shard(tmp_path / "index.parquet", tmp_path / "masks.parquet", shard, 2, settings,
                          out / "patches.npy", out / "descriptors.npy", out / "index.parquet", out / "stats.parquet")
    assert "blank.jpg" in caplog.text  # the page without patches is named
    table, patches = load_patches(outs[0] / "patches.npy", outs[0] / "index.parquet")
    desc = np.load(outs[0] / "descriptors.npy")
    stats = pd.read_parquet(outs[0] / "stats.parquet")
    # The cap bounds train samples; the test page keeps every patch, as the published code embeds it.
    test = int(np.flatnonzero(index.split.to_numpy()[:2] == "test")[0])
    test_id = f"d{test + 1}"
    uncapped = page_patches(read_mask(collection.ink_mask.iloc[test]), settings, key=test_id, cap=0)
    assert uncapped["n_kept"] > 300 and uncapped["n_capped"] == 0
    assert list(table.columns) == ["doc_id", "x", "y"]
    assert len(table) == len(patches) == len(desc) == 300 + uncapped["n_kept"]
    assert patches.shape[1:] == (32, 32) and patches.dtype == np.uint8 and desc.shape[1] == 128
    assert isinstance(patches, np.memmap)
    assert list(stats.columns) == ["doc_id", "writer", "split", *COUNTS, "seconds"]
    kept = dict(zip(stats.doc_id, stats.n_kept))
    assert kept[test_id] == uncapped["n_kept"] and kept[f"d{2 - test}"] == 300
    assert stats.set_index("doc_id").n_capped[test_id] == 0
    # Row i of the parquet is row i of the arrays: recompute one document's patches.
    direct = uncapped
    rows = np.flatnonzero(table.doc_id == test_id)
    np.testing.assert_array_equal(table[["x", "y"]].to_numpy()[rows], direct["xy"])
    np.testing.assert_array_equal(patches[rows], direct["patches"])
    np.testing.assert_array_equal(desc[rows], direct["descriptors"])
    empty_table, empty = load_patches(outs[1] / "patches.npy", outs[1] / "index.parquet")
    assert len(empty_table) == 0 and empty.shape == (0, 32, 32)
    assert np.load(outs[1] / "descriptors.npy").shape == (0, 128)
    merged = merge_stats([o / "stats.parquet" for o in outs], tmp_path / "stats.parquet")
    assert merged.doc_id.tolist() == ["d1", "d2", "d3"] and merged.n_kept.iloc[2] == 0
