import json

import cv2
import numpy as np
import pandas as pd
import pytest

from writer_retrieval.cluster import (SHEET_PER_ROW, assign_ratio, fit_clusters, patch_table, pseudo_labels,
                                      render_contact_sheet, sample_train, sheet_height, sheet_width)

SETTINGS = {"clusters": 6, "pca_dims": 8, "sample": 100000, "ratio": 0.9, "iterations": 10, "seed": 0}


def descriptors(rng, prototypes, n, noise=6.0):
    """uint8 SIFT-like rows scattered around the given prototypes; also the prototype ids."""
    which = rng.integers(len(prototypes), size=n)
    rows = prototypes[which] + rng.normal(0, noise, (n, 128))
    return np.clip(np.round(rows), 0, 255).astype(np.uint8), which


def write_shards(root, test_offset=0.0, seed=0):
    """Two shards: shard 0 holds train pages t0, t1; shard 1 the test page q0 and the train page t2.
    Test descriptors come from prototypes shifted by `test_offset`."""
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(123).gamma(0.7, 20, (6, 128))
    test_rng = np.random.default_rng(seed + 100)
    layout = [[("t0", 200, "train"), ("t1", 150, "train")], [("q0", 120, "test"), ("t2", 130, "train")]]
    paths = []
    for s, docs in enumerate(layout):
        descs, ids = [], []
        for doc, n, split in docs:
            if split == "test":
                d, _ = descriptors(test_rng, protos + test_offset, n)
            else:
                d, _ = descriptors(rng, protos, n)
            descs.append(d)
            ids += [doc] * n
        desc = np.concatenate(descs)
        shard_dir = root / f"shard{s}"
        shard_dir.mkdir(parents=True, exist_ok=True)
        np.save(shard_dir / "descriptors.npy", desc)
        np.save(shard_dir / "patches.npy", rng.integers(0, 2, (len(desc), 32, 32), dtype=np.uint8))
        pd.DataFrame({"doc_id": ids, "x": np.arange(len(ids), dtype=np.int32),
                      "y": np.zeros(len(ids), np.int32)}).to_parquet(shard_dir / "index.parquet")
        paths.append(shard_dir)
    pd.DataFrame({"doc_id": ["q0", "t0", "t1", "t2"], "writer": ["9", "1", "1", "2"],
                  "split": ["test", "train", "train", "train"]}).to_parquet(root / "index.parquet")
    return paths


def run(root, shard_dirs, settings=SETTINGS, tag="out"):
    out = root / tag
    table = pseudo_labels([d / "descriptors.npy" for d in shard_dirs], [d / "index.parquet" for d in shard_dirs],
                          [d / "patches.npy" for d in shard_dirs], root / "index.parquet", settings,
                          out / "patches.parquet", out / "stats.parquet", out / "summary.json",
                          out / "contact_sheet.png")
    return table, out


def test_assignment_ratio_rule():
    centroids = np.array([[0.0, 0.0], [2.0, 0.0]], np.float32)
    points = np.array([[1.0, 0.0],    # exactly between: ratio 1 -> ambiguous
                       [0.1, 0.0],    # near centroid 0
                       [1.9, 0.3],    # near centroid 1
                       [0.9, 0.0],    # ratio 0.9 / 1.1 = 0.82 -> still labelled
                       [0.96, 0.0],   # ratio 0.96 / 1.04 = 0.92 -> ambiguous
                       [2.0, 0.0]], np.float32)  # on centroid 1: ratio 0
    labels, ratios = assign_ratio(points, centroids, 0.9)
    assert labels.dtype == np.int32 and labels.tolist() == [-1, 0, 1, 0, -1, 1]
    np.testing.assert_allclose(ratios[[0, 3, 4, 5]], [1.0, 0.9 / 1.1, 0.96 / 1.04, 0.0], atol=1e-3)
    # With a looser threshold nothing but the tie is dropped.
    assert assign_ratio(points, centroids, 0.99)[0].tolist() == [-1, 0, 1, 0, 0, 1]


def test_labels_are_deterministic_and_tables_complete(tmp_path):
    shards = write_shards(tmp_path)
    a, out = run(tmp_path, shards, tag="a")
    b, _ = run(tmp_path, shards, tag="b")
    saved = pd.read_parquet(out / "patches.parquet")
    assert list(saved.columns) == ["doc_id", "x", "y", "split", "shard", "row", "cluster", "ratio"]
    assert saved.cluster.dtype == np.int32 and len(saved) == 600
    np.testing.assert_array_equal(saved.cluster, pd.read_parquet(tmp_path / "b" / "patches.parquet").cluster)
    assert saved.groupby("shard").row.max().tolist() == [349, 249]
    assert saved.split.value_counts().to_dict() == {"train": 480, "test": 120}
    # Well separated prototypes: 6 non-empty clusters, each a prototype, hardly any ambiguity.
    assert (saved.cluster >= 0).mean() > 0.95
    stats = pd.read_parquet(out / "stats.parquet")
    assert list(stats.columns) == ["cluster", "size_train", "size_all"] and stats.cluster.tolist() == list(range(6))
    assert stats.size_all.sum() == (saved.cluster >= 0).sum()
    assert stats.size_train.sum() == ((saved.cluster >= 0) & (saved.split == "train")).sum()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_patches"] == 600 and summary["n_train"] == summary["n_fit"] == 480
    assert summary["n_ambiguous"] == (saved.cluster < 0).sum() and summary["n_empty_clusters"] == 0
    # Contact sheet: 6 clusters with >= 12 train patches -> 6 rows of 12 patches.
    sheet = cv2.imread(str(out / "contact_sheet.png"), cv2.IMREAD_UNCHANGED)
    assert sheet.shape == (sheet_height(6, 32), sheet_width(32)) == (2 + 6 * 66, 56 + 12 * 66 + 2)


def test_fit_uses_train_patches_only(tmp_path):
    shards = write_shards(tmp_path / "x")
    moved = write_shards(tmp_path / "y", test_offset=40.0)  # test descriptors elsewhere, train ones the same
    a, _ = run(tmp_path / "x", shards)
    b, _ = run(tmp_path / "y", moved)
    train = (a.split == "train").to_numpy()
    np.testing.assert_array_equal(a.cluster[train], b.cluster[train])
    test_a, test_b = (np.load(d[1] / "descriptors.npy")[:120] for d in (shards, moved))
    assert not np.array_equal(test_a, test_b)
    table = patch_table([d / "index.parquet" for d in shards], tmp_path / "x" / "index.parquet")
    sample = sample_train(table, [d / "descriptors.npy" for d in shards], 10**6, 0)
    # All train rows, none of the 120 test rows (the first rows of shard 1).
    train_rows = np.concatenate([np.load(shards[0] / "descriptors.npy"), np.load(shards[1] / "descriptors.npy")[120:]])
    np.testing.assert_array_equal(sample, train_rows)
    # A smaller sample is a seeded subset.
    paths = [d / "descriptors.npy" for d in shards]
    small = sample_train(table, paths, 100, 3)
    assert len(small) == 100 and np.array_equal(small, sample_train(table, paths, 100, 3))
    assert not np.array_equal(small, sample_train(table, paths, 100, 4))
    m1, m2 = fit_clusters(sample, SETTINGS), fit_clusters(sample, SETTINGS)
    np.testing.assert_array_equal(m1.centroids, m2.centroids)


def test_fewer_points_than_clusters(tmp_path):
    shards = write_shards(tmp_path)
    with pytest.raises(ValueError, match=r"1000 clusters.*got 480"):
        run(tmp_path, shards, {**SETTINGS, "clusters": 1000})
    with pytest.raises(ValueError, match=r"50 clusters.*got 40"):
        run(tmp_path, shards, {**SETTINGS, "clusters": 50, "sample": 40})


def test_contact_sheet_layout():
    patch = np.zeros((32, 32), np.uint8)
    patch[10:20, 5:25] = 1
    image = render_contact_sheet([(7, np.stack([patch] * 3)), (123, np.stack([patch] * SHEET_PER_ROW))], 32)
    assert image.shape == (sheet_height(2, 32), sheet_width(32)) and image.dtype == np.uint8
    cell = image[2:66, 56:120]
    np.testing.assert_array_equal(cell, np.where(np.kron(patch, np.ones((2, 2), np.uint8)) > 0, 0, 255))
    assert image[2:66, :56].min() < 64  # the cluster id is written
    assert (image[2:66, 56 + 3 * 66:56 + 4 * 66 - 2] == 160).all()  # missing patches stay gray
    assert render_contact_sheet([], 32).shape == (sheet_height(0, 32), sheet_width(32))
