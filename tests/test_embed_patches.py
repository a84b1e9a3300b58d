"""Patch-based page embedding (SAGHOG): page descriptor = power-normalised sum of its patch encodings."""
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from test_saghog import TINY, write_patch_shards
from writer_retrieval import finetune as FT
from writer_retrieval.embed_patches import embed_patches_shard
from writer_retrieval.pretrain import saghog as S
from writer_retrieval.storage import write_parquet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Patch shards and a random-init encoder file."""
    root = tmp_path_factory.mktemp("embed_patches")
    encoder = root / "backbone.pt"
    torch.save(S.build_encoder(TINY, seed=0).state_dict(), encoder)
    return {"shards": write_patch_shards(root), "encoder": encoder}


def test_embed_patches_shard_by_hand(data, tmp_path, caplog):
    # dataset index sorted by doc_id, shard size 3: shard 1 = c, d, e (e has no patches)
    index = pd.DataFrame({"doc_id": ["a", "b", "bb", "c", "d", "e"], "writer": ["w1", "w1", "w1", "w2", "w2", "w3"],
                          "split": ["train"] * 6})
    write_parquet(index, tmp_path / "index.parquet")
    npy, idx = data["shards"][1]  # docs c (12 patches), d (6)
    encode = lambda p: p.reshape(len(p), -1)[:, :4].astype(np.float32) - 0.5  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="writer_retrieval"):
        stats = embed_patches_shard(npy, idx, encode, 5, 0.4, tmp_path / "v.npy", tmp_path / "i.parquet",
                                    tmp_path / "s.parquet", tmp_path / "index.parquet", 1, 3)
    assert "e: no patches" in caplog.text
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.shape == (3, 4) and vectors.dtype == np.float32
    patches = np.load(npy)
    for row, (start, stop) in enumerate([(0, 12), (12, 18)]):
        total = (patches[start:stop].reshape(stop - start, -1)[:, :4].astype(np.float64) - 0.5).sum(0)
        powered = np.sign(total) * np.abs(total) ** 0.4
        np.testing.assert_allclose(vectors[row], powered / np.linalg.norm(powered), rtol=1e-6)
    assert not vectors[2].any()
    ii = pd.read_parquet(tmp_path / "i.parquet")
    assert ii.doc_id.tolist() == ["c", "d", "e"] and ii.n_patches.tolist() == [12, 6, 0]
    assert list(pd.read_parquet(tmp_path / "s.parquet").columns) == ["doc_id", "writer", "split", "n_patches", "seconds"]
    assert stats.n_patches.tolist() == [12, 6, 0]
    # the shard does not match the dataset index shard: an error, not a silent loss
    with pytest.raises(ValueError, match="do not match"):
        embed_patches_shard(npy, idx, encode, 5, 0.4, tmp_path / "v.npy", tmp_path / "i.parquet",
                            tmp_path / "s.parquet", tmp_path / "index.parquet", 0, 3)
    # with the real encoder
    enc = FT.patch_encoder(data["encoder"], TINY, device="cpu")
    embed_patches_shard(npy, idx, enc, 8, 0.4, tmp_path / "w.npy", tmp_path / "j.parquet", tmp_path / "t.parquet",
                        tmp_path / "index.parquet", 1, 3)
    w = np.load(tmp_path / "w.npy")
    assert w.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(w[:2], axis=1), 1.0, rtol=1e-5)
