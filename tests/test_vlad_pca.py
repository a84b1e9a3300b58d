import numpy as np
import pytest

from writer_retrieval.errors import InputError
from writer_retrieval.pca import Whitening, whiten
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


# Whitening methods -------------------------------------------------------------------------------


def hand_pca(x, k):
    """Mean, components (rows) and per-component variance (ddof 1) of the first k principal axes, by SVD."""
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:k], s[:k] ** 2 / (len(x) - 1)


def align(components, reference):
    """Per-row signs that turn `components` into `reference` (principal axes are defined up to sign)."""
    signs = np.sign((components * reference).sum(axis=1))
    assert np.all(np.abs((components * reference).sum(axis=1)) > 1 - 1e-8)
    return signs


def l2(y):
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def fixed_input():
    rng = np.random.default_rng(7)
    fit = rng.normal(size=(30, 12)) * np.linspace(3, 0.2, 12) + 1.5
    fit[:, 11] = fit[:, 10] + 1e-5 * rng.normal(size=30)  # a near-duplicate column: tiny last variance
    other = rng.normal(size=(9, 12)) + 1.5
    return fit, other


def test_whiten_is_unchanged_against_hand_written_numpy():
    fit, other = fixed_input()
    model = Whitening(dims=20).fit(fit)  # asks for more than the 29 a 30-row fit set allows: 12 here
    mean, comps, var = hand_pca(fit, 12)
    keep = var > 1e-6 * var.max()  # the rank guard drops the near-duplicate direction
    assert keep.sum() == 11 and model.components_.shape == (11, 12)
    signs = align(model.components_, comps[keep])
    np.testing.assert_allclose(model.mean_, mean, rtol=1e-12)
    np.testing.assert_allclose(model.scale_, 1 / np.sqrt(var[keep]), rtol=1e-8)
    for rows in (fit, other):
        expected = l2((rows - mean) @ comps[keep].T / np.sqrt(var[keep])) * signs
        got = model.transform(rows)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=2e-6)


def in_input_space(model, y):
    """A transform's rows in the input coordinates (whiten and power return component coordinates)."""
    return y if model.method == "none" or model.residual_scale_ else y @ model.components_


def test_shrink_with_vanishing_lambda_is_whiten():
    rng = np.random.default_rng(3)
    fit = rng.normal(size=(40, 10)) * np.linspace(2, 0.5, 10)  # well-conditioned, full rank: k = D
    test = rng.normal(size=(15, 10))
    base = Whitening(dims=10, method="whiten").fit(fit)
    shrunk = Whitening(dims=10, method="shrink", shrinkage=1e-9).fit(fit)
    assert shrunk.transform(test).shape == (15, 10)
    np.testing.assert_allclose(shrunk.transform(test), base.transform(test) @ base.components_, atol=1e-5)
    # A large lambda tends to centring only (every direction the same scale).
    centring = Whitening(dims=10, method="shrink", shrinkage=1e9).fit(fit)
    np.testing.assert_allclose(centring.transform(test), l2(test - fit.mean(axis=0)), atol=1e-6)


def test_shrink_scale_is_the_documented_formula():
    fit, other = fixed_input()
    model = Whitening(dims=5, method="shrink", shrinkage=0.3).fit(fit)
    mean, comps, var = hand_pca(fit, 5)
    target = 0.3 * np.median(var)
    np.testing.assert_allclose(model.scale_, 1 / np.sqrt(var + target), rtol=1e-8)
    assert model.residual_scale_ == pytest.approx(1 / np.sqrt(target), rel=1e-8)
    # (C + target I)^(-1/2) by hand: eigenvalues var_j + target on the components, target elsewhere.
    signs = align(model.components_, comps)
    inv_sqrt = np.eye(12) / np.sqrt(target) + comps.T @ np.diag(1 / np.sqrt(var + target) - 1 / np.sqrt(target)) @ comps
    np.testing.assert_allclose(model.transform(other), l2((other - mean) @ inv_sqrt), atol=2e-6)
    assert signs.shape == (5,)


def test_shrink_keeps_what_the_fit_rows_do_not_span():
    rng = np.random.default_rng(4)
    basis = np.linalg.qr(rng.normal(size=(10, 10)))[0].T
    fit = rng.normal(size=(20, 3)) * [5.0, 2.0, 1.0] @ basis[:3] + 1.0
    outside = fit.mean(axis=0) + rng.normal(size=(6, 7)) @ basis[3:]  # centred: where fit never varies
    shrunk = Whitening(dims=8, method="shrink", shrinkage=0.1).fit(fit)
    np.testing.assert_allclose(shrunk.transform(outside), l2(outside - fit.mean(axis=0)), atol=1e-6)
    # whiten and power project onto the components: these vectors would lose everything.
    for projected in (Whitening(dims=8).fit(fit), Whitening(dims=8, method="power", power=0.25).fit(fit)):
        kept = (outside - projected.mean_) @ projected.components_.T
        assert np.linalg.norm(kept) < 1e-9 * np.linalg.norm(outside - projected.mean_)


@pytest.mark.parametrize("p", [0.1, 0.25, 0.4])
def test_power_gives_variance_proportional_to_var_to_the_one_minus_two_p(p):
    rng = np.random.default_rng(5)
    fit = rng.normal(size=(50, 9)) * np.geomspace(10, 0.01, 9)
    model = Whitening(dims=9, method="power", power=p).fit(fit)
    mean, comps, var = hand_pca(fit, 9)
    signs = align(model.components_, comps)
    z = (fit - model.mean_) @ model.components_.T * model.scale_  # before the final L2
    got = z.var(axis=0, ddof=1)
    np.testing.assert_allclose(got / got[0], var ** (1 - 2 * p) / var[0] ** (1 - 2 * p), rtol=1e-8)
    expected = l2((fit - mean) @ comps.T * var ** -p) * signs
    np.testing.assert_allclose(model.transform(fit), expected, atol=2e-6)


def low_rank(rng, n, basis, weights, noise=0.0):
    """Rows sum_j w_j z_j basis_j (z standard normal) plus isotropic noise of the given std."""
    coeff = rng.normal(size=(n, len(weights))) * weights
    return coeff @ basis[:len(weights)] + noise * rng.normal(size=(n, basis.shape[1]))


@pytest.mark.parametrize("method,kw", [("shrink", {"shrinkage": 0.1}), ("shrink", {"shrinkage": 1.0}),
                                       ("power", {"power": 0.25}), ("power", {"power": 0.4})])
@pytest.mark.parametrize("n_fit", [100, 30])
def test_rank_deficient_input_does_not_blow_up(method, kw, n_fit):
    """63-d float32 page vectors of rank 21 (one dominant direction, variance 1e6, and 20 of variance
    1), as summed encodings are: the 42 other directions (and, with 30 rows, 8 of the 29 components)
    carry float32 rounding only, which whitening without a guard would blow up to unit variance."""
    rng = np.random.default_rng(11)
    basis = np.linalg.qr(rng.normal(size=(63, 63)))[0].T  # orthonormal rows
    weights = np.r_[1000.0, np.ones(20)]
    fit = low_rank(rng, n_fit, basis, weights).astype(np.float32)
    fresh = low_rank(rng, 200, basis, weights).astype(np.float32)
    model = Whitening(dims=63, method=method, **kw).fit(fit)
    assert model.components_.shape[0] == 21  # only the numerically-zero components are dropped
    y = model.transform(fresh)
    assert np.isfinite(y).all() and np.allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    assert ((in_input_space(model, y) @ basis[21:].T) ** 2).sum(axis=1).max() < 1e-6
    unguarded = Whitening(dims=63, rank_tolerance=1e-30).fit(fit)
    assert unguarded.components_.shape[0] == min(63, n_fit - 1)
    blown = unguarded.transform(fresh) @ unguarded.components_ @ basis[21:].T
    assert (blown ** 2).sum(axis=1).mean() > 0.1  # what the guard (or its absence) is about


@pytest.mark.parametrize("method,kw,bound", [("shrink", {"shrinkage": 0.1}, 0.01), ("shrink", {"shrinkage": 1.0}, 0.01),
                                             ("power", {"power": 0.25}, 0.01), ("power", {"power": 0.4}, 0.1)])
def test_weak_components_are_damped_not_whitened(method, kw, bound):
    """One dominant direction (variance 1e6), 40 of variance 1 and 22 weak ones (variance 1e-4):
    shrink and power keep all 63 components, but the weak ones end up with a small share."""
    rng = np.random.default_rng(12)
    basis = np.linalg.qr(rng.normal(size=(63, 63)))[0].T
    weights = np.r_[1000.0, np.ones(40), np.full(22, 1e-2)]
    fit, fresh = low_rank(rng, 200, basis, weights), low_rank(rng, 200, basis, weights)
    model = Whitening(dims=63, method=method, **kw).fit(fit)
    assert model.components_.shape[0] == 63  # no hand-set guard
    # Weaker components never get more weight than stronger ones ...
    z = (fit - model.mean_) @ model.components_.T * model.scale_
    assert np.all(np.diff(z.var(axis=0, ddof=1)) <= 1e-12)
    # ... and the weak directions' share of each unit vector is small; full whitening makes it ~1/3.
    y = model.transform(fresh)
    assert ((in_input_space(model, y) @ basis[41:].T) ** 2).sum(axis=1).mean() < bound
    whitened = Whitening(dims=63, rank_tolerance=1e-30).fit(fit)  # full whitening, no guard
    assert ((whitened.transform(fresh) @ whitened.components_ @ basis[41:].T) ** 2).sum(axis=1).mean() > 0.25


def test_save_load_round_trip(tmp_path):
    fit, other = fixed_input()
    for model in (Whitening(dims=6).fit(fit), Whitening(dims=6, method="shrink", shrinkage=0.1).fit(fit),
                  Whitening(dims=6, method="power", power=0.25).fit(fit), Whitening(dims=6, method="none").fit(fit)):
        model.save(tmp_path / f"{model.method}.npz")
        loaded = Whitening.load(tmp_path / f"{model.method}.npz")
        assert loaded.method == model.method and loaded.regularisation == model.regularisation
        assert np.array_equal(loaded.transform(other), model.transform(other))
    assert Whitening.load(tmp_path / "none.npz").components_.shape == (0, 12)


def test_whiten_stage_fits_saves_and_transfers(tmp_path):
    import json

    import pandas as pd

    from writer_retrieval.pca import read_descriptors

    rng = np.random.default_rng(2)
    ids = [f"d{i}" for i in range(24)]
    index = pd.DataFrame({"doc_id": ids, "writer": [f"w{i // 2}" for i in range(24)],
                          "split": ["train"] * 12 + ["test"] * 12})
    index.to_parquet(tmp_path / "index.parquet")
    vectors = rng.normal(size=(24, 8)).astype(np.float32)
    settings = {"pca": "power", "pca_dims": 16, "pca_fit_on": "train", "pca_shrinkage": 0.1, "pca_power": 0.25,
                "seed": 0}
    whiten(ids, vectors, tmp_path / "index.parquet", settings, tmp_path / "a.parquet", tmp_path / "a.json",
           model_path=tmp_path / "a.npz")
    info = json.loads((tmp_path / "a.json").read_text())
    assert info["pca"] == "power" and info["pca_power"] == 0.25 and info["regularisation"] == 0.25
    assert info["n_fit"] == 12 and info["pca_dims"] == 8 and info["descriptor_dim"] == 8 and info["model"] == "fitted"
    assert 0.99 < info["explained_variance"] <= 1.0 + 1e-9
    # Applied to another dataset's vectors (same dimension): loaded, not refitted.
    whiten(ids, vectors * 2 + 1, tmp_path / "index.parquet", {**settings, "pca": "whiten"}, tmp_path / "b.parquet",
           tmp_path / "b.json", fitted_path=tmp_path / "a.npz")
    info = json.loads((tmp_path / "b.json").read_text())
    assert info["model"] == "loaded" and info["model_from"] == str(tmp_path / "a.npz") and info["pca"] == "power"
    expected = Whitening.load(tmp_path / "a.npz").transform(vectors * 2 + 1)
    assert np.array_equal(read_descriptors(tmp_path / "b.parquet")[1], expected)
    # Method none: L2 only, and the saved model says so; it needs no other setting.
    whiten(ids, vectors, tmp_path / "index.parquet", {"pca": "none"}, tmp_path / "n.parquet",
           tmp_path / "n.json", model_path=tmp_path / "n.npz")
    assert json.loads((tmp_path / "n.json").read_text())["pca_dims"] == 0
    assert Whitening.load(tmp_path / "n.npz").method == "none"
    np.testing.assert_allclose(read_descriptors(tmp_path / "n.parquet")[1],
                               vectors / np.linalg.norm(vectors, axis=1, keepdims=True), rtol=1e-6)


def test_a_fitted_model_of_another_dimension_is_refused_naming_the_file(tmp_path):
    import pandas as pd

    ids = [f"d{i}" for i in range(6)]
    pd.DataFrame({"doc_id": ids, "writer": ["a", "a", "b", "b", "c", "c"],
                  "split": ["train"] * 3 + ["test"] * 3}).to_parquet(tmp_path / "index.parquet")
    Whitening(dims=4, method="shrink", shrinkage=0.3).fit(np.random.default_rng(0).normal(size=(6, 8))) \
        .save(tmp_path / "other-dataset.npz")
    settings = {"pca": "shrink", "pca_dims": 4, "pca_fit_on": "train", "pca_shrinkage": 0.3, "seed": 0}
    with pytest.raises(InputError, match=r"other-dataset\.npz.*8-d.*5-d"):
        whiten(ids, np.ones((6, 5), np.float32), tmp_path / "index.parquet", settings, tmp_path / "d.parquet",
               tmp_path / "d.json", fitted_path=tmp_path / "other-dataset.npz")
    assert not (tmp_path / "d.parquet").exists()
    (tmp_path / "broken.npz").write_bytes(b"not a model")
    with pytest.raises(InputError, match="broken.npz"):
        Whitening.load(tmp_path / "broken.npz")


def test_bad_method_settings_are_refused():
    with pytest.raises(InputError, match="pca_power"):
        Whitening(dims=4, method="power", power=0.5)
    with pytest.raises(InputError, match="pca_shrinkage"):
        Whitening(dims=4, method="shrink", shrinkage=0.0)
    with pytest.raises(InputError, match="unknown method"):
        Whitening(dims=4, method="zca")
