import numpy as np
import pytest

from writer_retrieval.pca import Whitening
from writer_retrieval.vlad import encode, fit_codebook, residual_sums, sample_descriptors


def slow_vlad(x, centroids, intra, power):
    """Plain reference: one descriptor at a time."""
    v = np.zeros_like(centroids, dtype=np.float64)
    for row in x:
        a = np.argmin(((centroids - row) ** 2).sum(1))
        v[a] += row - centroids[a]
    if intra:
        for c in range(len(v)):
            n = np.linalg.norm(v[c])
            if n > 0:
                v[c] /= n
    v = v.ravel()
    v = np.sign(v) * np.abs(v) ** power
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("intra,power,chunk", [(False, 0.5, 65536), (True, 0.5, 7), (False, 1.0, 3)])
def test_vectorised_vlad_matches_the_slow_reference(intra, power, chunk):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)).astype(np.float32)
    centroids = rng.normal(size=(6, 8)).astype(np.float32)
    got = encode(x, centroids, {"chunk_size": chunk, "intra_norm": intra, "power": power})
    np.testing.assert_allclose(got, slow_vlad(x, centroids, intra, power), rtol=1e-5, atol=1e-6)
    assert got.shape == (48,) and np.linalg.norm(got) == pytest.approx(1.0, abs=1e-5)


def test_residual_sums_of_no_descriptors_are_zero():
    assert not residual_sums(np.zeros((0, 4), np.float32), np.ones((3, 4), np.float32)).any()


def test_codebook_sample_is_seeded_and_train_only():
    shards = [{"a": np.full((10, 2), 1.0), "b": np.full((5, 2), 2.0)}, {"c": np.full((20, 2), 3.0)}]
    split = {"a": "train", "b": "test", "c": "train"}
    s1 = sample_descriptors(shards, split, "train", 12, seed=3, load=lambda h: h)
    s2 = sample_descriptors(shards, split, "train", 12, seed=3, load=lambda h: h)
    assert s1.shape == (12, 2) and np.array_equal(s1, s2)
    assert set(np.unique(s1)) <= {1.0, 3.0}  # never the test document's descriptors
    assert len(sample_descriptors(shards, split, "train", 1000, seed=0, load=lambda h: h)) == 30
    with pytest.raises(ValueError, match="no local descriptors in the validation split"):
        sample_descriptors(shards, split, "validation", 5, seed=0, load=lambda h: h)


def test_codebook_is_deterministic_and_finds_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    x = (centres[rng.integers(0, 3, 600)] + rng.normal(scale=0.3, size=(600, 2))).astype(np.float32)
    a = fit_codebook(x, 3, 20, seed=1)
    assert np.array_equal(a, fit_codebook(x, 3, 20, seed=1))
    found = sorted(map(tuple, np.round(a).astype(int)))
    assert found == [(0, 0), (0, 10), (10, 0)]
    with pytest.raises(ValueError, match="at least as many descriptors"):
        fit_codebook(x[:2], 3, 5, seed=0)


def test_pca_rank_guard_never_whitens_zero_variance_components():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 10))
    x = rng.normal(size=(20, 3)) @ basis  # rank 3 in 10 dims
    model = Whitening(dims=8).fit(x)
    assert model.components_.shape == (3, 10)
    y = model.transform(x)
    assert np.isfinite(y).all() and np.allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    # Before the final L2, whitened fit data has unit variance per kept component.
    z = (x - model.mean_) @ model.components_.T * model.scale_
    np.testing.assert_allclose(z.var(axis=0, ddof=1), 1.0, rtol=1e-6)


def test_pca_dims_shrink_to_the_fit_set():
    x = np.random.default_rng(1).normal(size=(6, 50))
    assert Whitening(dims=384).fit(x).components_.shape[0] == 5
    with pytest.raises(ValueError, match="at least 2 documents"):
        Whitening(dims=4).fit(x[:1])
