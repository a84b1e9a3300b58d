"""Tests of the synthetic handwriting page generator."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from writer_retrieval import synthetic
from writer_retrieval.imaging import read_mask
from writer_retrieval.synthetic import generate_collection, make_writer_style, render_word_mask

W, H = 400, 520
ARGS = dict(writers=3, pages_per_writer=2, train_writers=1, page_width=W, page_height=H,
            difficulty=0.3, seed=11, progress=False)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_a")
    return out, generate_collection(out, **ARGS)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _gray(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float64)


# 1. determinism -------------------------------------------------------------------------------

def test_same_arguments_give_identical_bytes(collection, tmp_path):
    out_a, df_a = collection
    df_b = generate_collection(tmp_path / "b", **ARGS)
    files_a, files_b = _files(out_a), _files(tmp_path / "b")
    assert len(files_a) == 2 * 3 * 2
    assert files_a.keys() == files_b.keys()
    for name in files_a:
        assert files_a[name] == files_b[name], name
    assert list(df_a["page"]) == list(df_b["page"])


def test_process_pool_gives_identical_bytes(collection, tmp_path):
    out_a, _ = collection
    df = generate_collection(tmp_path / "pool", **{**ARGS, "workers": 2})
    files_a, files_p = _files(out_a), _files(tmp_path / "pool")
    assert files_a.keys() == files_p.keys()
    for name in files_a:
        assert files_a[name] == files_p[name], name
    assert len(df) == 6


# 2. counts and naming -------------------------------------------------------------------------

def test_counts_naming_and_splits(collection):
    out, df = collection
    assert list(df.columns) == ["path", "ink_mask", "writer", "page", "split"]
    assert len(df) == 3 * 2
    assert list(df["path"]) == sorted(df["path"])
    assert set(df["writer"]) == {"1", "2", "3"}
    assert (df.groupby("writer").size() == 2).all()
    for row in df.itertuples():
        jpg, png = Path(row.path), Path(row.ink_mask)
        assert re.fullmatch(r"\d+-IMG_MAX_\d+\.jpg", jpg.name), jpg.name
        assert jpg.name.split("-")[0] == row.writer
        assert jpg.parent == out / row.split
        assert png == out / "ground_truth" / f"{row.page}.png"
        assert jpg.stem == row.page
        assert jpg.is_file() and png.is_file()
        with Image.open(jpg) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (W, H)
        assert read_mask(png).shape == (H, W)
    assert df["page"].is_unique
    train = set(df.loc[df["split"] == "train", "writer"])
    test = set(df.loc[df["split"] == "test", "writer"])
    assert train == {"1"} and test == {"2", "3"}
    assert not train & test
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        Path(p).name for p in df.loc[df["split"] == "train", "path"])


def test_no_train_split_when_zero_train_writers(tmp_path):
    df = generate_collection(tmp_path, **{**ARGS, "writers": 2, "pages_per_writer": 1,
                                          "train_writers": 0})
    assert set(df["split"]) == {"test"} and len(df) == 2


# 3. mask aligns with ink ----------------------------------------------------------------------

def test_mask_marks_the_dark_ink(collection):
    _, df = collection
    for row in df.itertuples():
        gray = _gray(row.path)
        mask = read_mask(row.ink_mask)
        assert 0.01 < mask.mean() < 0.3, row.page
        inside, outside = gray[mask].mean(), gray[~mask].mean()
        assert outside - inside > 60, (row.page, inside, outside)
        background = np.median(gray[~mask])
        assert (gray[mask] < background - 25).mean() > 0.8, row.page
        # the mask does not miss dark ink: few very dark pixels lie off the mask's neighbourhood
        near = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        dark = gray < 0.5 * (inside + background)
        assert (dark & ~near).sum() < 0.02 * dark.sum(), row.page


def test_text_stays_inside_the_page(collection):
    _, df = collection
    for row in df.itertuples():
        mask = read_mask(row.ink_mask)
        ys, xs = np.nonzero(mask)
        assert ys.min() > 0.02 * H and ys.max() < 0.98 * H
        assert xs.min() > 0.02 * W and xs.max() < 0.98 * W
        rows = np.flatnonzero(mask.any(axis=1))
        # several lines of text: count runs of inked rows separated by blank ones
        profile = mask.sum(axis=1) > 0.01 * W
        runs = np.count_nonzero(np.diff(profile.astype(int)) == 1)
        assert runs >= 8, (row.page, runs)
        assert len(rows) > 0


# 4. variation ---------------------------------------------------------------------------------

def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


def test_other_seed_and_other_page_differ(collection, tmp_path):
    out_a, df_a = collection
    df_b = generate_collection(tmp_path, **{**ARGS, "writers": 2, "pages_per_writer": 1,
                                            "train_writers": 1, "seed": 12})
    for name in ("1-IMG_MAX_100000", ):
        pa = df_a.set_index("page").loc[name]
        pb = df_b.set_index("page").loc[name]
        assert Path(pa.path).read_bytes() != Path(pb.path).read_bytes()
        assert _iou(read_mask(pa.ink_mask), read_mask(pb.ink_mask)) < 0.5
    for writer, group in df_a.groupby("writer"):
        m1, m2 = (read_mask(p) for p in group["ink_mask"])
        assert _iou(m1, m2) < 0.5, writer


def test_page_colour_is_not_a_writer_constant():
    # paper tint and ink colour are drawn per page: pages of one writer differ in colour
    style = make_writer_style(5, "1")
    means = []
    for page in range(4):
        img, _ = synthetic.render_page(style, np.random.SeedSequence([5, 3, 1, page]), 300, 300, 0.5)
        means.append(img.reshape(-1, 3).mean(axis=0))
    spread = np.ptp(np.array(means), axis=0)
    assert spread.max() > 3.0


# 5. writer identity lives in the stroke shapes ------------------------------------------------

WORDS = ("handwriting", "garden", "morning", "quickly", "problem")


def _normalised(mask: np.ndarray) -> np.ndarray:
    """Word mask scaled to a fixed box (removes size and width), blurred, zero-mean, unit norm."""
    c = cv2.resize(mask.astype(np.float32), (192, 48), interpolation=cv2.INTER_AREA)
    c = cv2.GaussianBlur(c, (0, 0), 1.5)
    c -= c.mean()
    return c / np.linalg.norm(c)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float((_normalised(a) * _normalised(b)).sum())


def _similarities(style_a, style_b, difficulty, rng):
    same, cross = [], []
    for word in WORDS:
        a1 = render_word_mask(style_a, word, x_height=24, difficulty=difficulty, rng=rng)
        a2 = render_word_mask(style_a, word, x_height=24, difficulty=difficulty, rng=rng)
        b1 = render_word_mask(style_b, word, x_height=24, difficulty=difficulty, rng=rng)
        assert a1.any() and a2.any() and b1.any()
        assert not np.array_equal(a1, a2)          # two instances are not copies
        same.append(_corr(a1, a2))
        cross.append(_corr(a1, b1))
    return float(np.mean(same)), float(np.mean(cross))


@pytest.mark.parametrize("pair", [("1", "2"), ("3", "4"), ("5", "6"), ("7", "8")])
def test_instances_of_a_writer_resemble_each_other_more_than_another_writer(pair):
    style_a, style_b = make_writer_style(21, pair[0]), make_writer_style(21, pair[1])
    same, cross = _similarities(style_a, style_b, 0.5, np.random.default_rng(0))
    assert same > cross + 0.15, (same, cross)


@pytest.mark.parametrize("writer", ["1", "2", "3", "4", "5", "6"])
def test_allographs_alone_separate_writers(writer):
    # Writer B has every global parameter of A (face, slant, width, pen, spacing...): only the
    # per-letter shapes, seeded by the writer id, differ. They must still tell the writers apart.
    style_a = make_writer_style(21, writer)
    style_b = dataclasses.replace(style_a, writer=f"{writer}000")
    same, cross = _similarities(style_a, style_b, 1.0, np.random.default_rng(1))
    assert same > cross + 0.1, (same, cross)
    plain_a = render_word_mask(style_a, "garden", x_height=24)
    plain_b = render_word_mask(style_b, "garden", x_height=24)
    assert plain_a.shape != plain_b.shape or not np.array_equal(plain_a, plain_b)


def test_word_rendering_is_deterministic():
    style = make_writer_style(3, "2")
    a = render_word_mask(style, "letter", x_height=20, difficulty=0.7, rng=np.random.default_rng(4))
    b = render_word_mask(style, "letter", x_height=20, difficulty=0.7, rng=np.random.default_rng(4))
    assert np.array_equal(a, b)
    assert np.array_equal(render_word_mask(style, "letter"), render_word_mask(style, "letter"))


def test_writer_styles_differ_and_are_reproducible():
    assert make_writer_style(1, "1") == make_writer_style(1, "1")
    assert make_writer_style(1, "1") != make_writer_style(1, "2")
    assert make_writer_style(1, "1") != make_writer_style(2, "1")
    faces = {make_writer_style(1, str(w)).face for w in range(1, 40)}
    assert len(faces) >= 4 and faces <= set(synthetic.FACES)


# 6. bad arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("override, name", [
    ({"writers": 0}, "writers"),
    ({"pages_per_writer": 0}, "pages_per_writer"),
    ({"train_writers": -1}, "train_writers"),
    ({"train_writers": 3}, "train_writers"),
    ({"train_writers": 5}, "train_writers"),
    ({"writers": 2.5}, "writers"),
    ({"difficulty": 1.5}, "difficulty"),
    ({"difficulty": -0.1}, "difficulty"),
    ({"difficulty": math.nan}, "difficulty"),
    ({"seed": -1}, "seed"),
    ({"page_width": 10}, "page_width"),
    ({"page_height": 0}, "page_height"),
    ({"jpeg_quality": 0}, "jpeg_quality"),
    ({"jpeg_quality": 101}, "jpeg_quality"),
    ({"workers": 0}, "workers"),
])
def test_bad_arguments_raise(tmp_path, override, name):
    with pytest.raises(ValueError, match=name):
        generate_collection(tmp_path, **{**ARGS, **override})
    assert not any(tmp_path.iterdir())       # nothing written before the check
