import numpy as np
import pandas as pd
import pytest
from PIL import Image

from writer_retrieval.binarize import binarize_page, binarize_shard, merge_shards, n_shards, pixel_quality
from writer_retrieval.imaging import read_mask, write_mask

from pages import handwriting_like


def test_pixel_quality_hand_computed():
    truth = np.array([[1, 1, 0, 0],
                      [1, 0, 0, 0]], bool)
    pred = np.array([[1, 0, 1, 0],
                     [1, 0, 0, 0]], bool)
    q = pixel_quality(pred, truth)
    # tp = 2, fp = 1, fn = 1: precision = recall = F = 2/3; MSE = 2/8 -> PSNR = 10 log10(4)
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 3)
    assert q["f_measure"] == pytest.approx(2 / 3)
    assert q["psnr"] == pytest.approx(10 * np.log10(4))
    assert pixel_quality(truth, truth)["psnr"] == float("inf")
    with pytest.raises(ValueError, match="differs from ground truth"):
        pixel_quality(pred[:, :3], truth)


@pytest.mark.parametrize("settings", [{"method": "otsu"}, {"method": "sauvola", "window": 31, "k": 0.2}])
def test_polarity_dark_ink_is_true(settings):
    gray = np.full((100, 120), 230, np.uint8)
    gray[40:60, 30:90] = 20
    mask, threshold = binarize_page(gray, settings)
    assert mask.dtype == bool and 20 <= threshold < 230
    assert mask[50, 60] and not mask[5, 5]
    assert mask[40:60, 30:90].mean() > 0.95 and mask[:30].mean() < 0.01


def test_shards_cover_the_index_and_merge_writes_tables(tmp_path):
    rows = []
    for i in range(5):
        gray = handwriting_like(seed=i)
        path = tmp_path / "pages" / f"d{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(gray).save(path)
        gt = None
        if i < 3:  # ground truth where we know it: the strokes are the dark pixels
            gt = tmp_path / "gt" / f"d{i}.png"
            write_mask(gt, gray < 128)
        rows.append({"doc_id": f"d{i}", "path": str(path), "writer": f"w{i % 2}", "page": f"d{i}",
                     "split": "test", "width": 160, "height": 120, "ground_truth": None if gt is None else str(gt)})
    pd.DataFrame(rows).to_parquet(tmp_path / "index.parquet")
    settings = {"method": "sauvola", "window": 25, "k": 0.2}
    assert n_shards(5, 2) == 3 and n_shards(0, 2) == 1
    shards = [binarize_shard(tmp_path / "index.parquet", s, 2, settings, tmp_path / "masks", tmp_path / f"s{s}.parquet")
              for s in range(3)]
    assert [len(s) for s in shards] == [2, 2, 1]
    table = merge_shards([tmp_path / f"s{s}.parquet" for s in range(3)], tmp_path / "stats.parquet",
                         tmp_path / "quality.parquet")
    assert list(table.doc_id) == [f"d{i}" for i in range(5)]
    stats = pd.read_parquet(tmp_path / "stats.parquet")
    quality = pd.read_parquet(tmp_path / "quality.parquet")
    assert len(stats) == 5 and list(quality.doc_id) == ["d0", "d1", "d2"]
    assert (quality.f_measure > 0.9).all()
    mask = read_mask(stats.mask_path[0])
    assert mask.shape == (120, 160) and mask.mean() == pytest.approx(stats.ink_ratio[0])
