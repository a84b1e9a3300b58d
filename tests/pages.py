"""Small generated test images (a module of its own: `conftest` is ambiguous once workflow_tests/
has a conftest.py too)."""
import numpy as np


def handwriting_like(height=120, width=160, seed=0) -> np.ndarray:
    """A light page with a few dark strokes (enough ink not to count as an empty page)."""
    import cv2

    rng = np.random.default_rng(seed)
    page = np.full((height, width), 235, np.uint8)
    for _ in range(6):
        pts = rng.integers(10, [width - 10, height - 10], size=(4, 2)).astype(np.int32)
        cv2.polylines(page, [pts], False, 30, thickness=3)
    return page
