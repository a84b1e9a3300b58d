import numpy as np
import pandas as pd
import pytest
import torch

from writer_retrieval.embed import embed_page, foreground_patches, fuse_layers, page_windows
from writer_retrieval.pca import sum_pooled_cls
from writer_retrieval.storage import write_npy, write_parquet

TINY = {"arch": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}


def test_windows_cover_the_page_and_pad_with_paper():
    ink = np.zeros((300, 500), bool)
    ink[299, 499] = True  # the very last pixel
    windows, origins = page_windows(ink, 224, 224)
    assert origins == [(0, 0), (0, 224), (0, 448), (224, 0), (224, 224), (224, 448)]
    assert windows.shape == (6, 224, 224)
    assert windows[5, 75, 51] and windows.sum() == 1  # found once, padding is paper
    overlapping, origins = page_windows(ink, 224, 112)
    assert [o[0] for o in origins[::4]] == [0, 112]  # rows 0, 112 cover 300 (112 + 224 = 336)
    assert len(origins) == 2 * 4 and overlapping.sum() == 1  # columns 0, 112, 224, 336; only (112, 336) holds it
    small, origins = page_windows(np.ones((50, 60), bool), 224, 224)
    assert origins == [(0, 0)] and small[0, :50, :60].all() and not small[0, 50:].any()


def test_foreground_rule_on_a_hand_made_window():
    window = np.zeros((32, 32), bool)
    window[0, :10] = True          # patch 0 (top left): 10 ink pixels
    window[0, 16:25] = True        # patch 1 (top right): 9
    window[16:32, 16:32] = True    # patch 3 (bottom right): 256; patch 2 (bottom left): 0
    fg = foreground_patches(window[None], patch=16, t_fg=10)
    assert fg.tolist() == [[True, False, False, True]]
    assert foreground_patches(window[None], 16, 9).tolist() == [[True, True, False, True]]


def test_layer_fusion():
    a, b = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    assert fuse_layers([a, b], "concat").shape == (2, 3, 8)
    assert torch.equal(fuse_layers([a, b], "mean"), torch.full((2, 3, 4), 0.5))
    with pytest.raises(ValueError, match="allowed: concat, mean"):
        fuse_layers([a, b], "max")


def test_sum_pooling_of_window_cls(tmp_path):
    write_npy(np.array([[1, 2], [3, 4], [10, 10]], np.float16), tmp_path / "c.npy")
    write_parquet(pd.DataFrame({"doc_id": ["a", "b", "c"], "n_windows": [2, 1, 0], "cls_offset": [0, 2, 3],
                                "n_tokens": [0, 0, 0], "offset": [0, 0, 0]}), tmp_path / "i.parquet")
    pooled = sum_pooled_cls(tmp_path / "c.npy", tmp_path / "i.parquet")
    assert pooled["a"].tolist() == [4, 6] and pooled["b"].tolist() == [10, 10] and pooled["c"].tolist() == [0, 0]


@pytest.fixture(scope="module")
def backbone():
    from writer_retrieval.vit import build_backbone

    return build_backbone(TINY, seed=0).eval()


def settings(**over):
    return {"window": 64, "stride": 64, "t_fg": 10, "layers": 1, "fuse": "concat", "batch_size": 4, **over}


def test_empty_windows_are_skipped_and_only_foreground_tokens_kept(backbone):
    ink = np.zeros((128, 192), bool)  # 2 x 3 windows of 64
    ink[70:90, 70:100] = True         # writing inside window (1, 1) only
    out = embed_page(backbone, ink, settings(), 16, torch.device("cpu"))
    windows, _ = page_windows(ink, 64, 64)
    fg = foreground_patches(windows, 16, 10)
    assert out["n_windows"] == 6 and out["n_windows_embedded"] == 1
    assert out["cls"].shape == (1, 32) and out["tokens"].shape == (int(fg.sum()), 32)
    blank = embed_page(backbone, np.zeros((128, 192), bool), settings(), 16, torch.device("cpu"))
    assert blank["n_windows_embedded"] == 0 and blank["dim"] is None


def test_multi_layer_tokens_concat_and_mean(backbone):
    ink = np.zeros((64, 64), bool)
    ink[10:50, 20:30] = True
    one = embed_page(backbone, ink, settings(), 16, torch.device("cpu"))
    two = embed_page(backbone, ink, settings(layers=2), 16, torch.device("cpu"))
    mean = embed_page(backbone, ink, settings(layers=2, fuse="mean"), 16, torch.device("cpu"))
    assert two["tokens"].shape[1] == 64 and mean["tokens"].shape[1] == 32
    np.testing.assert_allclose(two["tokens"][:, 32:], one["tokens"], rtol=1e-5, atol=1e-5)  # last block = final tokens
    np.testing.assert_allclose(mean["tokens"], (two["tokens"][:, :32] + two["tokens"][:, 32:]) / 2, rtol=1e-5, atol=1e-5)


def test_embed_shard_writes_token_shards_that_read_back(backbone, tmp_path):
    """Tokens and window [CLS] rows of a shard, read back by the VLAD and sum-pooling loaders."""
    from writer_retrieval.embed import embed_shard
    from writer_retrieval.imaging import write_mask
    from writer_retrieval.vlad import load_tokens

    pages = {"a": np.zeros((128, 64), bool), "b": np.zeros((64, 64), bool), "c": np.zeros((64, 128), bool)}
    pages["a"][5:120, 20:30] = True
    pages["c"][10:50, 70:120] = True  # "b" stays blank: no tokens, no windows
    for doc, ink in pages.items():
        write_mask(tmp_path / f"{doc}.png", ink)
    write_parquet(pd.DataFrame({"doc_id": list(pages), "writer": ["w1", "w1", "w2"], "split": "test",
                                "path": list(pages)}), tmp_path / "index.parquet")
    write_parquet(pd.DataFrame({"doc_id": list(pages), "mask_path": [str(tmp_path / f"{d}.png") for d in pages]}),
                  tmp_path / "masks.parquet")
    out = {name: tmp_path / name for name in ("t.npy", "c.npy", "i.parquet", "s.parquet")}
    stats = embed_shard(tmp_path / "index.parquet", tmp_path / "masks.parquet", 0, 10,
                        {**settings(), "seed": 0, "model": TINY}, None, *out.values(), device="cpu")
    tokens, pooled = load_tokens(out["t.npy"], out["i.parquet"]), sum_pooled_cls(out["c.npy"], out["i.parquet"])
    assert list(tokens) == list(pooled) == list(pages)
    for doc, ink in pages.items():
        page = embed_page(backbone, ink, settings(), 16, torch.device("cpu"))
        expected = page["tokens"] if page["dim"] else np.zeros((0, 32), np.float32)
        np.testing.assert_allclose(tokens[doc], expected, rtol=2e-3, atol=2e-3)  # stored as float16
        np.testing.assert_allclose(pooled[doc], page["cls"].sum(axis=0) if page["dim"] else 0, rtol=2e-3, atol=5e-3)
    assert stats.n_tokens.tolist() == [len(tokens[d]) for d in pages] and stats.n_tokens.iloc[1] == 0
