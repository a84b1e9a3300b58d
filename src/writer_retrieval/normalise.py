"""Signed power + L2 normalisation of descriptors, the one implementation every stage uses
(VLAD vectors, summed patch encodings, whitened and reranked descriptors)."""
from __future__ import annotations

import numpy as np


def power_l2(x: np.ndarray, power: float = 1.0, axis: int | None = -1) -> np.ndarray:
    """sign(x) |x|^power, then L2-normalised along `axis` (None: the whole array as one vector);
    zero vectors stay zero. Computes in the dtype of `x` (float64 where it matters is the caller's
    choice), and power 1 skips the power step."""
    x = np.asarray(x)
    if power != 1.0:
        x = np.sign(x) * np.abs(x) ** float(power)
    norms = np.linalg.norm(x, axis=axis, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
