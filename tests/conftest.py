import numpy as np
import pytest
import torch
from PIL import Image

from pages import handwriting_like


@pytest.fixture
def write_page():
    def _write(path, seed=0, mode="L", **save):
        path.parent.mkdir(parents=True, exist_ok=True)
        gray = handwriting_like(seed=seed)
        Image.fromarray(gray).convert(mode).save(path, **save)
        return path
    return _write


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is as fast and does not suffer from busy neighbours."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def stroke_page():
    """A seeded binary page of random pen strokes (ink = True), for the pretraining tests."""
    import cv2

    def draw(seed, height=300, width=300) -> np.ndarray:
        rng = np.random.default_rng(seed)
        page = np.zeros((height, width), np.uint8)
        for _ in range(40):
            pts = rng.integers(0, [width, height], size=(4, 2)).astype(np.int32)
            cv2.polylines(page, [pts], False, 1, thickness=int(rng.integers(2, 6)))
        return page > 0

    return draw
