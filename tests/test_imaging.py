import numpy as np
import pytest
from PIL import Image

from writer_retrieval.imaging import BadImageError, load_gray, read_mask, write_mask

from pages import handwriting_like


@pytest.fixture
def gray():
    return handwriting_like()


def test_8bit_gray_png_round_trip(tmp_path, gray):
    Image.fromarray(gray).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_gray(tmp_path / "a.png"), gray)


def test_16bit_gray_png_and_tiff_scale_to_8bit(tmp_path, gray):
    g16 = gray.astype(np.uint16) * 257  # full 16-bit range
    Image.fromarray(g16).save(tmp_path / "a.png")
    Image.fromarray(g16).save(tmp_path / "a.tif")
    for name in ("a.png", "a.tif"):
        out = load_gray(tmp_path / name)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, gray)


def test_12bit_data_in_16bit_container_uses_its_bit_depth(tmp_path):
    g12 = np.array([[0, 4095], [2048, 1000]], np.uint16)
    Image.fromarray(g12).save(tmp_path / "a.tif")
    out = load_gray(tmp_path / "a.tif")
    assert out[0, 0] == 0 and out[0, 1] == 255 and 126 <= out[1, 0] <= 128


def test_rgb_jpeg_and_palette_png(tmp_path, gray):
    rgb = np.stack([gray] * 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    out = load_gray(tmp_path / "a.jpg")
    assert out.shape == gray.shape and np.abs(out.astype(int) - gray).mean() < 3
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "p.png")
    out = load_gray(tmp_path / "p.png")
    assert out.shape == gray.shape and np.abs(out.astype(int) - gray).mean() < 10


def test_rgba_transparent_pixels_become_white_paper(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)  # black, fully transparent
    rgba[0, 0] = (0, 0, 0, 255)  # one opaque black ink pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_gray(tmp_path / "a.png")
    assert out[0, 0] == 0 and (out.ravel()[1:] == 255).all()


def test_1bit_png(tmp_path):
    bits = np.zeros((8, 8), bool)
    bits[2:4] = True
    Image.fromarray(bits).save(tmp_path / "a.png")
    out = load_gray(tmp_path / "a.png")
    assert set(np.unique(out)) == {0, 255} and (out[2:4] == 255).all()


@pytest.mark.parametrize("name,damage,reason", [
    ("a.jpg", lambda b: b[: len(b) // 2], "truncated"),
    ("a.png", lambda b: b[: len(b) // 2], "truncated"),
    ("a.jpg", lambda b: b"", "zero bytes"),
    ("a.png", lambda b: b"this is not an image at all" * 10 + b"IEND", "unreadable"),
])
def test_damaged_files_are_rejected_with_reason(tmp_path, gray, name, damage, reason):
    good = tmp_path / ("good" + name[1:])
    Image.fromarray(gray).save(good)
    bad = tmp_path / name
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(BadImageError, match=reason):
        load_gray(bad)


def test_float_tiff_is_unsupported_mode(tmp_path):
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(BadImageError, match="unsupported mode"):
        load_gray(tmp_path / "f.tif")


def test_mask_polarity_ink_is_one(tmp_path):
    mask = np.zeros((5, 7), bool)
    mask[1, 2] = mask[3, 5] = True
    write_mask(tmp_path / "m.png", mask)
    stored = Image.open(tmp_path / "m.png")
    assert stored.mode == "1"
    assert np.asarray(stored)[1, 2] and not np.asarray(stored)[0, 0]
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def asymmetric_page() -> np.ndarray:
    """A non-square page (120 x 160) with a dark block in one corner, so every flip/rotation differs."""
    page = handwriting_like()
    page[5:35, 5:45] = 20
    return page


# EXIF orientation -> the numpy transform that makes the stored pixels upright.
UPRIGHT = {
    2: np.fliplr, 3: lambda g: np.rot90(g, 2), 4: np.flipud, 5: lambda g: g.T,
    6: lambda g: np.rot90(g, -1), 7: lambda g: np.rot90(g, 2).T, 8: lambda g: np.rot90(g, 1),
}


def save_with_orientation(path, gray, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(gray).save(path, exif=exif, quality=95)
    return path


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = asymmetric_page()
    out = load_gray(save_with_orientation(tmp_path / "a.jpg", stored, orientation))
    expected = UPRIGHT[orientation](stored)
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected).mean() < 3  # JPEG tolerance
    if out.shape == stored.shape:  # the stored (sideways or mirrored) pixels are clearly not what came out
        assert np.abs(out.astype(int) - stored).mean() > 10
