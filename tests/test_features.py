import numpy as np
import pytest

from writer_retrieval.features import root_sift, sift_page
from writer_retrieval.synthetic import generate_collection
from writer_retrieval.imaging import load_gray, read_mask

SETTINGS = {"kind": "sift", "contrast_threshold": 0.04, "edge_threshold": 10, "sigma": 1.6, "octave_layers": 3,
            "max_keypoints": 0, "describe_on": "gray"}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    table = generate_collection(tmp_path_factory.mktemp("p"), writers=2, pages_per_writer=1, train_writers=1,
                                page_width=400, page_height=500, difficulty=0.3, seed=0, progress=False)
    row = table.iloc[0]
    return load_gray(row.path), read_mask(row.ink_mask)


def test_sift_keypoints_unique_upright_and_on_writing(page):
    gray, ink = page
    coords, desc, n_detected = sift_page(gray, ink, SETTINGS)
    assert len(coords) > 100 and desc.shape == (len(coords), 128) and desc.dtype == np.uint8
    keys = {(round(x, 2), round(y, 2), round(s, 2)) for x, y, s, _ in coords}
    assert len(keys) == len(coords) <= n_detected  # duplicates (one per orientation) removed
    # Keypoints describe strokes: ink lies within each keypoint's support region.
    def ink_within(x, y, size):
        r = max(3, int(size))
        return ink[max(0, int(y) - r):int(y) + r + 1, max(0, int(x) - r):int(x) + r + 1].any()

    assert np.mean([ink_within(x, y, s) for x, y, s, _ in coords]) > 0.97


def test_sift_is_deterministic_and_binarized_description_differs(page):
    gray, ink = page
    a = sift_page(gray, ink, SETTINGS)
    b = sift_page(gray, ink, SETTINGS)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = sift_page(gray, ink, {**SETTINGS, "describe_on": "binarized"})
    assert np.array_equal(a[0][:, :3], c[0][:, :3]) and not np.array_equal(a[1], c[1])


def test_empty_page_gives_no_descriptors():
    coords, desc, _ = sift_page(np.full((64, 64), 255, np.uint8), np.zeros((64, 64), bool), SETTINGS)
    assert coords.shape == (0, 4) and desc.shape == (0, 128)


def test_root_sift_is_hellinger_normalised():
    d = np.array([[4, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.uint8)
    r = root_sift(d)
    np.testing.assert_allclose(r[0], [1, 0, 0, 0])
    np.testing.assert_allclose(r[1], [0.5, 0.5, 0.5, 0.5])
    assert not r[2].any()
    np.testing.assert_allclose(np.linalg.norm(r[:2], axis=1), 1.0, rtol=1e-6)
