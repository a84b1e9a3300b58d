"""Reranking: hand-built cases and equivalence with dense references written here."""
import numpy as np
import pytest
import scipy.sparse as sp

from writer_retrieval.errors import InputError
from writer_retrieval.rerank import gnn, krnn, neighbours, rerank, rerank_test_split, sgr
from writer_retrieval.metrics import evaluate


def l2(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n, dim=32, per_writer=4, noise=0.9, seed=0):
    rng = np.random.default_rng(seed)
    writers = np.repeat(np.arange(n // per_writer), per_writer)
    x = rng.normal(size=(len(writers) // per_writer, dim))[writers] + noise * rng.normal(size=(len(writers), dim))
    return l2(x).astype(np.float32), writers


def fragments(n_writers=8, pages=2, frags=3, dim=16, page_noise=0.4, frag_noise=0.05, seed=0):
    """Fragment data: each writer's pages scattered around the writer, each page's fragments
    near-identical (siblings far closer than the writer's other page). (x, writers, pages)."""
    rng = np.random.default_rng(seed)
    writers = np.repeat(np.arange(n_writers), pages * frags)
    page_of = np.repeat(np.arange(n_writers * pages), frags)
    centres = rng.normal(size=(n_writers, dim))[np.arange(n_writers * pages) // pages]
    page_vectors = l2(centres + page_noise * rng.normal(size=centres.shape))
    x = page_vectors[page_of] + frag_noise * rng.normal(size=(len(page_of), dim))
    return l2(x).astype(np.float32), writers, page_of


# ---- dense references, straight from the published formulas (../shared/docs/methods.md)

def dense_krnn(x, k, groups=None):
    s = x @ x.T
    n = len(x)
    other = np.ones((n, n), bool) if groups is None else groups[:, None] != groups[None, :]
    nk = [[j for j in np.argsort(-s[i], kind="stable") if j != i and other[i, j]][:k] for i in range(n)]
    out = np.empty_like(x)
    for i in range(n):
        r = [j for j in nk[i] if i in nk[j]]
        out[i] = (x[i] + x[r].sum(axis=0)) / (len(r) + 1)
    return l2(out)


def dense_sgr(x, k, layers, gamma, groups=None):
    """groups: A0 = 0 on same-group pairs i != j, and those columns are never among a row's k strongest."""
    s = (x @ x.T).astype(np.float64)
    a = np.exp(-((1 - s) ** 2) / gamma)
    n = len(x)
    same = np.zeros((n, n), bool) if groups is None else (groups[:, None] == groups[None, :]) & ~np.eye(n, dtype=bool)
    a[same] = 0.0
    for _ in range(layers):
        a = (a + a.T) / 2
        new = np.empty_like(a)
        for i in range(len(a)):
            nbrs = np.argsort(-np.where(same[i], -np.inf, a[i]), kind="stable")[: k + 1][1:]
            new[i] = a[i] + sum(s[i, j] * a[:, j] for j in nbrs)
        a = l2(new)  # every row from the previous layer's A, never updated in place
    return a


def dense_gnn(x, k1, k2, layers, groups=None):
    s = (x @ x.T).astype(np.float64)
    n = len(x)
    order = np.argsort(-s, axis=1, kind="stable")
    if groups is not None:  # the row itself, then the best documents of other groups
        order = np.array([[i] + [j for j in order[i] if groups[j] != groups[i]][: max(k1, k2)] for i in range(n)])
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


# ---- same-page exclusion (groups / settings graph: other_pages)

SETTINGS = [{"method": "krnn", "k": 2}, {"method": "sgr", "k": 2, "layers": 2, "gamma": 0.5, "m": 10},
            {"method": "gnn", "k1": 1, "k2": 2, "layers": 2, "m": 8}]


def parts(out):
    """Every array that makes up a reranker's output, for bit-for-bit comparison."""
    if hasattr(out, "u"):
        return [*parts(out.t), out.u, out.v]
    if sp.issparse(out):
        out = out.tocsr()
        out.sort_indices()
        return [out.indptr, out.indices, out.data]
    return [out]


def assert_identical(a, b):
    pa_, pb = parts(a), parts(b)
    assert len(pa_) == len(pb)
    for u, v in zip(pa_, pb):
        assert u.dtype == v.dtype and np.array_equal(u, v)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s["method"])
def test_no_groups_and_singleton_groups_give_the_unrestricted_output(settings):
    x, _ = clustered(120)
    x[5] = x[6] = x[4]  # duplicates: the row-first and tie paths of neighbours()
    direct = {"krnn": lambda: krnn(x, 2), "sgr": lambda: sgr(x, 2, 2, 0.5, 10),
              "gnn": lambda: gnn(x, 1, 2, 2, 8)}[settings["method"]]()
    assert_identical(rerank(x, settings), direct)
    assert_identical(rerank(x, settings, groups=None), direct)
    assert_identical(rerank(x, settings, groups=np.arange(120)[::-1] * 3), direct)  # any labels, one per document


def test_neighbours_with_groups_are_the_exact_best_of_other_groups():
    x, _ = clustered(200)
    groups = np.random.default_rng(1).integers(0, 60, 200)  # uneven groups, sizes 0..~9
    s = x @ x.T
    for k in (1, 2, 10):
        scores, idx = neighbours(x, k, groups)
        assert idx.shape == (200, k) and (idx[:, 0] == np.arange(200)).all()
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)
        assert (groups[idx[:, 1:]] != groups[:, None]).all()
        other = np.where(groups[:, None] != groups[None, :], s, -np.inf)
        best = -np.sort(-other, axis=1)[:, : k - 1]
        np.testing.assert_allclose(scores[:, 1:], best, atol=1e-5)  # exact: the k-1 best others, in order
        np.testing.assert_allclose(np.take_along_axis(s, idx[:, 1:], 1), scores[:, 1:], atol=1e-5)
    with pytest.raises(ValueError, match="one entry per document"):
        neighbours(x, 3, groups[:-1])


def test_fragment_neighbours_are_siblings_without_groups_and_other_pages_with():
    x, writers, pages = fragments()
    _, idx = neighbours(x, 3)  # kRNN k = 2 and GNN max(k1, k2) = 2 lists
    assert (pages[idx[:, 1:]] == pages[:, None]).all()  # unrestricted: both neighbours are siblings
    _, idx = neighbours(x, 3, pages)
    assert not (pages[idx[:, 1:]] == pages[:, None]).any()
    assert (writers[idx[:, 1:]] == writers[:, None]).all()  # the writer's other page comes next
    _, idx = neighbours(x, 100, pages)  # capped: every document outside the row's page
    assert idx.shape == (48, 46) and not (pages[idx[:, 1:]] == pages[:, None]).any()


def test_fragment_rerankers_with_groups_move_toward_the_writers_other_page():
    x, writers, pages = fragments()
    target = (writers[:, None] == writers[None, :]) & (pages[:, None] != pages[None, :])
    before = (x @ x.T)[target].mean()
    unrestricted, grouped = krnn(x, 2), krnn(x, 2, pages)
    np.testing.assert_allclose(grouped, dense_krnn(x, 2, pages), atol=1e-5)
    # kRNN rows live in descriptor space: the query itself moves toward the other page's fragments.
    assert (grouped @ x.T)[target].mean() > (unrestricted @ x.T)[target].mean() + 0.05
    assert (grouped @ x.T)[target].mean() > before + 0.05
    unrestricted, grouped = gnn(x, 1, 2, 1), gnn(x, 1, 2, 1, groups=pages)
    np.testing.assert_allclose(grouped.toarray(), dense_gnn(x, 1, 2, 1, pages), atol=1e-6)
    u, g = unrestricted.toarray(), grouped.toarray()
    # Unrestricted GNN rows only hold the own page, so other-page scores vanish; with groups they do not.
    assert (u @ u.T)[target].mean() < 0.05 < 0.5 < (g @ g.T)[target].mean()
    a, _ = evaluate(unrestricted, writers, pages, exclude_same="page")
    b, _ = evaluate(grouped, writers, pages, exclude_same="page")
    assert b["map"] > a["map"] + 0.5


@pytest.mark.parametrize("layers", [1, 2])
def test_sgr_with_groups_equals_dense_reference_when_every_pair_is_kept(layers):
    x, _, pages = fragments()
    out = sgr(x, k=2, layers=layers, gamma=0.5, m=100, groups=pages)  # m >= N: T holds every other-page pair
    np.testing.assert_allclose(dense(out), dense_sgr(x, 2, layers, 0.5, pages), atol=1e-6)


def test_sgr_with_groups_cancels_the_background_on_same_group_pairs():
    x, _, pages = fragments(n_writers=100, frags=4, dim=32, page_noise=0.8, frag_noise=0.06)
    a0 = dense(sgr(x, k=2, layers=0, gamma=0.5, m=20, groups=pages))  # no layer: A0 itself
    same = (pages[:, None] == pages[None, :]) & ~np.eye(len(x), dtype=bool)
    np.testing.assert_allclose(a0[same], 0.0, atol=1e-6)
    np.testing.assert_allclose(np.diag(a0), 1.0, atol=1e-6)


def test_sgr_with_groups_sparse_low_rank_matches_dense_map():
    x, writers, pages = fragments(n_writers=100, frags=4, dim=32, page_noise=0.8, frag_noise=0.06)
    sparse_m, _ = evaluate(sgr(x, k=2, layers=2, gamma=0.4, m=100, groups=pages), writers, pages, "page")
    dense_m, _ = evaluate(dense_sgr(x, 2, 2, 0.4, pages).astype(np.float32), writers, pages, "page")
    assert abs(sparse_m["map"] - dense_m["map"]) <= 0.002, (sparse_m["map"], dense_m["map"])


def test_rerank_test_split_reads_pages_for_graph_other_pages(tmp_path):
    import pandas as pd
    import pyarrow.parquet as pq

    from writer_retrieval.lowrank import SparseLowRank
    from writer_retrieval.pca import descriptor_table
    from writer_retrieval.storage import read_reranked

    x, writers, pages = fragments()
    index = pd.DataFrame({"doc_id": [f"d{i}" for i in range(len(x))], "writer": writers.astype(str),
                          "page": [f"p{q}" for q in pages], "split": np.where(writers < 6, "test", "train")})
    pq.write_table(descriptor_table(index.doc_id, index, x), tmp_path / "descriptors.parquet")
    index.to_parquet(tmp_path / "index.parquet")
    test = writers < 6
    for graph in ("all", "other_pages", None):
        settings = {"method": "gnn", "k1": 1, "k2": 2, "layers": 1, "m": 8, **({"graph": graph} if graph else {})}
        rerank_test_split(tmp_path / "descriptors.parquet", settings, tmp_path / "out.npz", tmp_path / "index.parquet")
        ids, rows = read_reranked(tmp_path / "out.npz", SparseLowRank)
        assert ids.tolist() == index.doc_id[test].tolist()
        expected = rerank(x[test], settings, pages[test] if graph == "other_pages" else None)
        np.testing.assert_array_equal(rows.toarray(), expected.toarray().astype(np.float32))
    settings["graph"] = "other_pages"
    with pytest.raises(ValueError, match="other_pages needs the dataset index"):
        rerank_test_split(tmp_path / "descriptors.parquet", settings, tmp_path / "out.npz")
    settings["graph"] = "pages"
    with pytest.raises(ValueError, match="unknown rerank graph"):
        rerank_test_split(tmp_path / "descriptors.parquet", settings, tmp_path / "out.npz", tmp_path / "index.parquet")


def test_pair_dots_is_the_same_dense_or_gathered():
    from writer_retrieval.lowrank import pair_dots

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(50, 300)).astype(np.float32), rng.normal(size=(40, 300)).astype(np.float32)
    dense_rows, dense_cols = rng.integers(0, 50, 5000), rng.integers(0, 40, 5000)  # covers a b^T: blocks
    few_rows, few_cols = dense_rows[:30], dense_cols[:30]  # a few pairs: gathered
    reference = (a.astype(np.float64) @ b.T.astype(np.float64))
    np.testing.assert_allclose(pair_dots(a, b, dense_rows, dense_cols, chunk=512),
                               reference[dense_rows, dense_cols], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pair_dots(a, b, few_rows, few_cols), reference[few_rows, few_cols], rtol=1e-4, atol=1e-4)
