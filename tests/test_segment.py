"""SAM page/region segmentation: region rules, cleaning, checkpoint errors, the whole SAM path.

The SAM path runs on the testing-only random-weights model (build_sam(...,
random_weights_for_testing=True)): tiny, seeded, 256 px input. Its masks are arbitrary, so those
tests assert on structure (files, shapes, columns, ranges), not on segmentation quality.
"""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from writer_retrieval import segment as S
from writer_retrieval.binarize import binarize_page
from writer_retrieval.errors import InputError
from writer_retrieval.imaging import load_gray, read_mask

H, W = 100, 100


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: extra threads only contend (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rect(y0, y1, x0, x1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def sam_dict(seg):
    """A SAM automatic-mask-generator record (the keys select_region may see)."""
    ys, xs = np.nonzero(seg)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)] if len(ys) else [0, 0, 0, 0]
    return {"segmentation": seg, "area": int(seg.sum()), "bbox": bbox, "predicted_iou": 0.9, "stability_score": 0.9}


# ---------------------------------------------------------------- select_region

def test_largest_mask_over_two_thirds_is_chosen():
    page = rect(5, 95, 10, 88)           # 70.2 %
    block = rect(0, 20, 90, 100)         # 2 %
    other = rect(40, 60, 20, 60)         # 8 %, inside the page
    masks = [sam_dict(block), sam_dict(page), sam_dict(other)]   # not sorted on input
    region, reason = S.select_region(masks, H, W)
    assert region.dtype == bool and region.shape == (H, W)
    assert np.array_equal(region, page)
    assert reason == "largest mask covers more than 66% of the page"


def test_only_the_largest_when_others_differ_in_size():
    page = rect(0, 80, 0, 90)            # 72 %, touches top and left only: not inverted
    chart = rect(85, 100, 0, 100)        # 15 %: a second object (colour chart), kept out
    region, reason = S.select_region([sam_dict(chart), sam_dict(page)], H, W)
    assert np.array_equal(region, page)
    assert "largest mask" in reason


def test_frame_touching_all_borders_is_inverted_to_the_page():
    inner = rect(5, 95, 8, 92)           # the page: 75.6 %
    frame = ~inner                       # background around it touches all four borders
    small = rect(40, 50, 40, 50)
    region, reason = S.select_region([sam_dict(frame), sam_dict(small)], H, W)
    assert np.array_equal(region, inner)
    assert reason == ("largest mask covers more than 66% of the page "
                      "(background mask touching all four borders inverted)")


def test_frame_with_small_page_goes_through_the_keep_rule():
    inner = rect(30, 70, 30, 70)         # 16 % page inside a 84 % background frame
    region, reason = S.select_region([sam_dict(~inner)], H, W)
    assert np.array_equal(region, inner)
    assert reason.startswith("no mask covers more than 66%: union of the masks covering more than 10%")
    assert reason.endswith("(background mask touching all four borders inverted)")


def test_mask_filling_the_scan_is_not_inverted():
    full = np.ones((H, W), bool)
    full[50, 50] = False                 # complement 0.01 % < keep: the mask is the page itself
    region, reason = S.select_region([sam_dict(full)], H, W)
    assert np.array_equal(region, full)
    assert reason == "largest mask covers more than 66% of the page"


def test_two_similar_masks_are_united():
    left = rect(10, 90, 5, 48)           # 34.4 %
    right = rect(10, 90, 52, 92)         # 32.0 %: within 15 % of left
    small = rect(92, 100, 0, 20)         # 1.6 %
    region, reason = S.select_region([sam_dict(small), sam_dict(right), sam_dict(left)], H, W)
    assert np.array_equal(region, left | right)
    assert reason == "union of the two largest masks (areas within 15% of each other)"


def test_union_rule_applies_to_nested_page_outlines_over_two_thirds():
    outer = rect(2, 98, 4, 96)           # 88.3 % (not touching any border)
    inner = rect(5, 95, 6, 94)           # 79.2 %: within 15 %
    region, reason = S.select_region([sam_dict(inner), sam_dict(outer)], H, W)
    assert np.array_equal(region, outer)
    assert reason.startswith("union of the two largest masks")


def test_dissimilar_masks_fall_to_the_keep_rule():
    a = rect(0, 40, 0, 90)               # 36 %
    b = rect(50, 70, 0, 100)             # 20 %: not within 15 %
    c = rect(75, 87, 0, 100)             # 12 %
    d = rect(90, 95, 0, 100)             # 5 %: below keep
    region, reason = S.select_region([sam_dict(m) for m in (d, c, b, a)], H, W)
    assert np.array_equal(region, a | b | c)
    assert reason == "no mask covers more than 66%: union of the masks covering more than 10%"


def test_similar_but_small_masks_are_not_united():
    a, b = rect(0, 10, 0, 50), rect(20, 30, 0, 48)   # 5 % and 4.8 %
    region, reason = S.select_region([sam_dict(a), sam_dict(b)], H, W)
    assert region.all()
    assert reason == "no mask covers more than 10% of the page: page kept whole"


def test_fallback_keeps_the_page_whole():
    masks = [sam_dict(rect(0, 5, 0, 100)), sam_dict(rect(50, 58, 10, 60))]
    region, reason = S.select_region(masks, H, W)
    assert region.all() and region.shape == (H, W)
    assert reason == "no mask covers more than 10% of the page: page kept whole"


def test_empty_mask_list_and_empty_masks():
    region, reason = S.select_region([], 30, 40)
    assert region.shape == (30, 40) and region.all()
    assert reason == "SAM returned no masks: page kept whole"
    region, reason = S.select_region([sam_dict(np.zeros((30, 40), bool))], 30, 40)
    assert region.all()
    assert reason == "SAM returned only empty masks: page kept whole"


def test_thresholds_appear_in_reasons_and_shapes_are_checked():
    page = rect(5, 80, 5, 80)            # 56 %
    region, reason = S.select_region([sam_dict(page)], H, W, large=0.5)
    assert np.array_equal(region, page) and reason == "largest mask covers more than 50% of the page"
    with pytest.raises(ValueError, match="shape"):
        S.select_region([sam_dict(np.ones((10, 10), bool))], H, W)


# ---------------------------------------------------------------- clean_page, edge_map

def test_clean_page_sets_background_to_paper_and_crops():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 200, size=(60, 80), dtype=np.uint8)
    region = np.zeros((60, 80), bool)
    region[10:30, 20:50] = True          # an L shape: the crop box holds background too
    region[30:45, 20:30] = True
    cleaned, box = S.clean_page(gray, region)
    assert box == (10, 45, 20, 50)
    assert cleaned.shape == (35, 30) and cleaned.dtype == np.uint8
    inside = region[10:45, 20:50]
    assert np.array_equal(cleaned[inside], gray[10:45, 20:50][inside])
    assert (cleaned[~inside] == 255).all() and (~inside).any()
    with pytest.raises(ValueError, match="empty region"):
        S.clean_page(gray, np.zeros_like(region))


def test_edge_map_is_three_channel_canny():
    gray = np.full((80, 100), 60, np.uint8)
    gray[20:60, 25:75] = 230
    edges = S.edge_map(gray)
    assert edges.shape == (80, 100, 3) and edges.dtype == np.uint8
    assert np.array_equal(edges[..., 0], edges[..., 1]) and np.array_equal(edges[..., 0], edges[..., 2])
    assert set(np.unique(edges)) == {0, 255}
    assert edges[19:22, 30:70, 0].any() and not edges[40, 40:60, 0].any()   # the paper's border, not its inside


# ---------------------------------------------------------------- checkpoints

def test_missing_checkpoint_names_the_key_and_files(tmp_path):
    for checkpoint in (None, "", tmp_path / "nowhere" / "sam.pth"):
        with pytest.raises(InputError) as info:
            S.check_checkpoint("vit_h", checkpoint)
        msg = str(info.value)
        assert "preprocess.sam.checkpoint" in msg
        for name in ("sam_vit_h_4b8939.pth", "sam_vit_l_0b3195.pth", "sam_vit_b_01ec64.pth", "mobile_sam.pt"):
            assert name in msg
        assert "segment-anything" in msg and "MobileSAM" in msg and "Model Checkpoints" in msg
    with pytest.raises(InputError, match="does not exist"):
        S.check_checkpoint("vit_t", tmp_path / "mobile_sam.pt")
    with pytest.raises(InputError, match="not a file"):
        S.check_checkpoint("vit_t", tmp_path)


def test_unknown_model_type_lists_the_types(tmp_path):
    with pytest.raises(InputError) as info:
        S.check_checkpoint("vit_x", tmp_path / "x.pth")
    msg = str(info.value)
    assert "vit_x" in msg
    for t in ("vit_h", "vit_l", "vit_b", "vit_t"):
        assert t in msg
    with pytest.raises(InputError, match="vit_t"):
        S.build_sam("sam2", None, random_weights_for_testing=True)


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_wrong_checkpoints_raise_clear_input_errors(tmp_path):
    # A random small state dict.
    junk = _save({"foo.weight": torch.randn(3, 3)}, tmp_path / "junk.pt")
    with pytest.raises(InputError) as info:
        S.build_sam("vit_t", junk)
    msg = str(info.value)
    assert "does not fit model_type vit_t" in msg and "1 unexpected keys" in msg and "missing" in msg
    assert "does not look like a SAM or MobileSAM checkpoint" in msg

    # Not a torch file at all.
    text = tmp_path / "sam_vit_b_01ec64.pth"
    text.write_text("<html>404 Not Found</html>\n")
    with pytest.raises(InputError, match="could not be read as PyTorch weights"):
        S.build_sam("vit_b", text)

    # A torch file that is not a state dict.
    listing = _save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(InputError, match="does not contain a state dict"):
        S.build_sam("vit_b", listing)

    # ViT-B-shaped encoder weights given as vit_h (checked on the meta device: no 2.5 GB model).
    vit_b_like = _save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
                        "image_encoder.pos_embed": torch.zeros(1, 64, 64, 768)}, tmp_path / "b.pth")
    with pytest.raises(InputError) as info:
        S.build_sam("vit_h", vit_b_like)
    msg = str(info.value)
    assert "does not fit model_type vit_h" in msg and "is it a vit_b checkpoint" in msg
    assert "preprocess.sam.model_type: vit_b" in msg and "with a different shape" in msg


def test_test_models_state_dicts_do_not_fit_real_models(tmp_path):
    tiny_vit_b = S.build_sam("vit_b", None, random_weights_for_testing=True)
    path = _save(tiny_vit_b.state_dict(), tmp_path / "tiny_b.pt")
    with pytest.raises(InputError) as info:
        S.build_sam("vit_t", path)
    msg = str(info.value)
    assert "does not fit model_type vit_t" in msg and "embed dim 64" in msg

    tiny_vit_t = S.build_sam("vit_t", None, random_weights_for_testing=True)
    path = _save(tiny_vit_t.state_dict(), tmp_path / "tiny_t.pt")
    with pytest.raises(InputError) as info:
        S.build_sam("vit_b", path)
    assert "is it a vit_t checkpoint" in str(info.value)
    with pytest.raises(InputError) as info:
        S.build_sam("vit_t", path)     # right family, wrong sizes
    assert "with a different shape" in str(info.value) and "its shapes look like vit_t" in str(info.value)


def test_a_fitting_checkpoint_loads_and_mobilesam_bias_cache_is_rebuilt(tmp_path):
    import mobile_sam

    reference = mobile_sam.sam_model_registry["vit_t"]()
    state = reference.state_dict()
    gen = torch.Generator().manual_seed(0)
    for k in state:
        if k.endswith("attention_biases"):
            state[k] = torch.randn(state[k].shape, generator=gen)
    path = _save({"model": state}, tmp_path / "mobile_sam.pt")     # wrapped, as training checkpoints are
    sam = S.build_sam("vit_t", path)
    assert not sam.training
    loaded = sam.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    attn = next(m for m in sam.modules() if hasattr(m, "attention_bias_idxs"))
    assert torch.equal(attn.ab, attn.attention_biases[:, attn.attention_bias_idxs])   # not the zeros of init


def test_testing_switch_is_explicit_and_seeded(tmp_path):
    with pytest.raises(ValueError, match="checkpoint=None"):
        S.build_sam("vit_b", tmp_path / "x.pth", random_weights_for_testing=True)
    with pytest.raises(ValueError, match="random_weights_for_testing"):
        S.build_sam("vit_b", tmp_path / "x.pth", image_size=256)
    state = torch.random.get_rng_state()
    a = S.build_sam("vit_t", None, random_weights_for_testing=True, image_size=128).state_dict()
    b = S.build_sam("vit_t", None, random_weights_for_testing=True, image_size=128).state_dict()
    assert torch.equal(state, torch.random.get_rng_state())           # global RNG untouched
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the whole SAM path

def synthetic_scan(seed, height=240, width=320):
    """Dark strokes on a light paper rectangle inside a darker scanner background."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full((height, width), 60, np.uint8)
    img[30:height - 30, 40:width - 40] = 228
    for _ in range(14):
        pts = rng.integers([55, 45], [width - 55, height - 45], size=(5, 2)).astype(np.int32)
        cv2.polylines(img, [pts], False, 25, thickness=2)
    return img


@pytest.fixture
def scans(tmp_path):
    rows = []
    for i in range(2):
        path = tmp_path / "in" / f"page{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_scan(i)).save(path)
        rows.append({"doc_id": f"w{i:02d}-p0", "path": str(path), "writer": f"w{i:02d}", "split": "train"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("model_type, settings", [
    # segment_anything parts (ImageEncoderViT), production generator settings (8x8 points, one batch)
    ("vit_b", {"min_keypoints": 0}),
    # mobile_sam TinyViT; 4x4 points in batches of 8 (two batches), every page dropped by the filter
    ("vit_t", {"points_per_side": 4, "points_per_batch": 8, "min_keypoints": 10**6}),
])
def test_segment_pages_random_weights(tmp_path, scans, model_type, settings):
    out = tmp_path / "sam"
    settings = {"model_type": model_type, "checkpoint": None, "image_size": 256, **settings}
    table = S.segment_pages(scans, settings, out / "pages", out / "regions", device="cpu",
                            random_weights_for_testing=True)

    assert list(table.columns) == ["doc_id", "region_area_ratio", "kept", "reason", "seconds", "crop_y0",
                                   "crop_y1", "crop_x0", "crop_x1", "n_masks", "ink_pixels", "n_keypoints"]
    assert list(table.doc_id) == list(scans.doc_id)
    assert table["kept"].dtype == bool
    for row, source in zip(table.itertuples(index=False), scans.itertuples(index=False)):
        page = load_gray(source.path)
        region = read_mask(out / "regions" / f"{row.doc_id}.png")
        cleaned = load_gray(out / "pages" / f"{row.doc_id}.png")
        assert region.shape == page.shape
        assert 0.0 < row.region_area_ratio <= 1.0
        assert row.region_area_ratio == pytest.approx(region.mean())
        assert 0 <= row.crop_y0 < row.crop_y1 <= page.shape[0] and 0 <= row.crop_x0 < row.crop_x1 <= page.shape[1]
        assert cleaned.shape == (row.crop_y1 - row.crop_y0, row.crop_x1 - row.crop_x0)
        crop_region = region[row.crop_y0:row.crop_y1, row.crop_x0:row.crop_x1]
        assert np.array_equal(cleaned[crop_region], page[row.crop_y0:row.crop_y1, row.crop_x0:row.crop_x1][crop_region])
        assert (cleaned[~crop_region] == 255).all()
        assert isinstance(row.reason, str) and row.reason
        assert row.n_masks >= 0 and row.seconds > 0 and row.ink_pixels >= 0 and row.n_keypoints >= 0
        assert row.kept == (row.n_keypoints >= settings["min_keypoints"])
        assert ("too little writing" in row.reason) == (not row.kept)
    if model_type == "vit_t":
        assert not table["kept"].any()
        assert table["reason"].str.endswith("; too little writing: fewer than 1000000 SIFT keypoints").all()
    else:
        assert table["kept"].all()


def test_segment_page_accepts_a_model_and_is_deterministic():
    sam = S.build_sam("vit_b", None, random_weights_for_testing=True, image_size=128)
    gray = synthetic_scan(3, 120, 160)
    settings = {"points_per_side": 3, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.7}
    a = S.segment_page(gray, sam, settings)
    b = S.segment_page(gray, S.make_generator(sam, settings), settings)
    assert set(a) == {"region", "cleaned", "box", "reason", "n_masks", "seconds"}
    assert a["n_masks"] > 0 and a["n_masks"] == b["n_masks"]
    assert np.array_equal(a["region"], b["region"]) and a["box"] == b["box"] and a["reason"] == b["reason"]


def test_segment_pages_without_checkpoint_stops_before_any_work(tmp_path, scans):
    with pytest.raises(InputError, match="preprocess.sam.checkpoint"):
        S.segment_pages(scans, {"model_type": "vit_t"}, tmp_path / "pages", tmp_path / "regions", device="cpu")
    assert not (tmp_path / "sam").exists()


# ---------------------------------------------------------------- sam+sauvola

def test_combine_with_binarizer_keeps_ink_inside_the_region_only():
    gray = synthetic_scan(5)
    region = np.zeros(gray.shape, bool)
    region[30:210, 40:160] = True        # the left half of the paper
    settings = {"method": "sauvola", "window": 25, "k": 0.2}
    ink = S.combine_with_binarizer(gray, region, settings)
    full, _ = binarize_page(gray, settings)
    assert ink.dtype == bool and ink.shape == gray.shape
    assert not ink[~region].any() and full[~region].any()
    assert np.array_equal(ink, full & region) and ink.any()
    with pytest.raises(ValueError, match="shape"):
        S.combine_with_binarizer(gray, region[:10], settings)
