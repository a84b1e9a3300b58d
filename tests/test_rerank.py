"""Reranking: hand-built cases and equivalence with dense references written here."""
import numpy as np
import pytest
import scipy.sparse as sp

from writer_retrieval.errors import InputError
from writer_retrieval.rerank import gnn, krnn, sgr
from writer_retrieval.retrieval import evaluate


def l2(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n, dim=32, per_writer=4, noise=0.9, seed=0):
    rng = np.random.default_rng(seed)
    writers = np.repeat(np.arange(n // per_writer), per_writer)
    x = rng.normal(size=(len(writers) // per_writer, dim))[writers] + noise * rng.normal(size=(len(writers), dim))
    return l2(x).astype(np.float32), writers


# ---- dense references, straight from the published formulas (../shared/docs/methods.md)

def dense_krnn(x, k):
    s = x @ x.T
    n = len(x)
    nk = [[j for j in np.argsort(-s[i], kind="stable") if j != i][:k] for i in range(n)]
    out = np.empty_like(x)
    for i in range(n):
        r = [j for j in nk[i] if i in nk[j]]
        out[i] = (x[i] + x[r].sum(axis=0)) / (len(r) + 1)
    return l2(out)


def dense_sgr(x, k, layers, gamma):
    s = (x @ x.T).astype(np.float64)
    a = np.exp(-((1 - s) ** 2) / gamma)
    for _ in range(layers):
        a = (a + a.T) / 2
        new = np.empty_like(a)
        for i in range(len(a)):
            nbrs = np.argsort(-a[i], kind="stable")[: k + 1][1:]
            new[i] = a[i] + sum(s[i, j] * a[:, j] for j in nbrs)
        a = l2(new)  # every row from the previous layer's A, never updated in place
    return a


def dense_gnn(x, k1, k2, layers):
    s = (x @ x.T).astype(np.float64)
    n = len(x)
    order = np.argsort(-s, axis=1, kind="stable")
    a = np.zeros((n, n))
    for i in range(n):
        a[i, order[i, : k1 + 1]] = 1.0
    for _ in range(layers):
        a = (a + a.T) / 2
        new = np.empty_like(a)
        for i in range(n):
            new[i] = a[i] + sum(s[i, j] ** 2 * a[:, j] for j in order[i, : k2 + 1])
        a = l2(new)
    return a


def dense(x):
    if hasattr(x, "to_dense"):
        return x.to_dense()
    return x.toarray() if sp.issparse(x) else x


def top10(x):
    """Top-10 per query; scores rounded to 1e-4 so that exact ties (kRNN gives the members of a
    reciprocal pair the same vector) are broken by index, not by BLAS rounding."""
    x = dense(x)
    s = np.round((x @ x.T).astype(np.float64), 4)
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :10]


# ---- hand-built cases

def test_krnn_merges_reciprocal_pairs_only():
    a, b = np.array([1.0, 0.0, 0.0]), l2(np.array([[1.0, 0.2, 0.0]]))[0]
    c = l2(np.array([[0.9, 0.9, 0.0]]))[0]  # c's nearest is b, but b's nearest is a
    d = np.array([0.0, 0.0, 1.0])
    x = np.stack([a, b, c, d]).astype(np.float32)
    out = krnn(x, k=1)
    merged = l2((a + b)[None])[0]
    np.testing.assert_allclose(out[0], merged, atol=1e-6)
    np.testing.assert_allclose(out[1], merged, atol=1e-6)
    np.testing.assert_allclose(out[2], c, atol=1e-6)  # no reciprocal neighbour: unchanged
    np.testing.assert_allclose(out[3], d, atol=1e-6)


@pytest.mark.parametrize("method", [sgr, gnn])
def test_graph_rerankers_keep_unit_rows(method):
    x, _ = clustered(60)
    out = dense(method(x))
    assert out.shape == (60, 60)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


def test_sgr_first_layer_symmetrises_and_keeps_kernel_values():
    x, _ = clustered(80)
    a0 = np.exp(-((1 - (x @ x.T).astype(np.float64)) ** 2) / 0.5)
    from writer_retrieval.rerank import SparseLowRank, _sparse, fit_background, neighbours

    s_val, s_idx = neighbours(x, 10)
    alpha, beta = fit_background(x, s_val, 0.5)
    t = _sparse(np.arange(80), s_idx, np.exp(-((1 - s_val) ** 2) / 0.5) - (alpha + beta * s_val), 80)
    a = SparseLowRank(t, np.hstack([np.full((80, 1), alpha), beta * x]), np.hstack([np.ones((80, 1)), x]))
    approx = a.to_dense()
    kept = t.toarray() != 0
    np.testing.assert_allclose(approx[kept], a0[kept], atol=1e-6)  # kept entries are exact
    assert np.abs(approx[~kept] - a0[~kept]).mean() < 0.05 * a0[~kept].mean() + 0.01  # background: a line in S
    sym = ((t + t.T) * 0.5).toarray() + a.u @ a.v.T
    np.testing.assert_allclose(sym, sym.T, atol=1e-6)


def test_gnn_first_layer_symmetrises_a_one_sided_adjacency():
    # d2's nearest neighbour is d1, but d1's is d0: the binary top-2 adjacency is not symmetric.
    x = l2(np.array([[1, 0.0], [1, 0.3], [1, 0.9], [0, 1.0]])).astype(np.float32)
    np.testing.assert_allclose(gnn(x, k1=1, k2=1).toarray(), dense_gnn(x, 1, 1, 1), atol=1e-6)


def test_duplicates_give_no_nan_and_zero_vectors_a_clear_error():
    x, _ = clustered(40)
    x[5] = x[4]
    x[6] = x[4]
    for method in (krnn, sgr, gnn):
        assert np.isfinite(dense(method(x))).all()
    x[7] = 0
    for method in (krnn, sgr, gnn):
        with pytest.raises(InputError, match="1 are all zeros .first at row 7."):
            method(x)


# ---- equivalence with the dense references

def test_krnn_matches_dense_reference_top10():
    x, _ = clustered(400)
    for k in (1, 2, 3):
        sparse_out = krnn(x, k)
        dense_out = dense_krnn(x, k)
        np.testing.assert_allclose(sparse_out, dense_out, atol=1e-5)
        assert np.array_equal(top10(sparse_out), top10(dense_out))


def test_gnn_matches_dense_reference():
    x, writers = clustered(400)
    sparse_out = gnn(x, k1=1, k2=2, layers=1)
    dense_out = dense_gnn(x, 1, 2, 1)
    np.testing.assert_allclose(sparse_out.toarray(), dense_out, atol=1e-6)  # exact: no truncation needed
    a, _ = evaluate(sparse_out, writers)
    b, _ = evaluate(dense_out.astype(np.float32), writers)
    assert abs(a["map"] - b["map"]) <= 0.002


@pytest.mark.parametrize("gamma,layers,seed", [(0.5, 1, 0), (0.4, 2, 0), (0.9, 1, 1)])
def test_sgr_sparse_low_rank_matches_dense_map(gamma, layers, seed):
    x, writers = clustered(800, noise=1.0, seed=seed)
    base, _ = evaluate(x, writers)
    sparse_m, _ = evaluate(sgr(x, k=2, layers=layers, gamma=gamma, m=100), writers)
    dense_m, _ = evaluate(dense_sgr(x, 2, layers, gamma).astype(np.float32), writers)
    assert abs(sparse_m["map"] - dense_m["map"]) <= 0.002, (sparse_m["map"], dense_m["map"])
    assert sparse_m["map"] > base["map"]  # reranking helps on clustered data
    # Scoring the sparse + low-rank rows equals scoring their dense form.
    out = sgr(x[:100], k=2, layers=layers, gamma=gamma, m=20)
    np.testing.assert_allclose(out.scores(0, 100), dense(out) @ dense(out).T, atol=1e-5)


def test_reranked_files_round_trip(tmp_path):
    """Each kind of reranked rows (dense, sparse, sparse + low rank) reads back as written."""
    from writer_retrieval.lowrank import SparseLowRank
    from writer_retrieval.storage import read_reranked, write_reranked

    x, _ = clustered(24)
    doc_ids = np.array([f"d{i}" for i in range(len(x))])
    for name, rows in [("krnn", krnn(x, 2)), ("gnn", gnn(x, 1, 2, 1)), ("sgr", sgr(x, 2, 1, 0.5, 8))]:
        write_reranked(tmp_path / f"{name}.npz", doc_ids, rows)
        ids, back = read_reranked(tmp_path / f"{name}.npz", SparseLowRank)
        assert ids.tolist() == doc_ids.tolist()
        np.testing.assert_array_equal(dense(back), dense(rows).astype(dense(back).dtype))  # GNN: stored as float32
        assert isinstance(back, SparseLowRank) == (name == "sgr")
