"""Writer-resampled bootstrap and paired comparisons: hand-checked tiny cases."""
import numpy as np
import pandas as pd
import pytest

from writer_retrieval.bootstrap import (_BLOCK, _draw_counts, _percentile_interval, _replicate_stats,
                                        _writer_totals, bootstrap_replicates, metric_intervals,
                                        paired_comparison, per_query_metrics, writer_bootstrap)


def frequencies(stats, support):
    return np.array([np.mean(np.isclose(stats, s)) for s in support])


# ---- the resampling: writers are drawn, queries follow them

def test_two_writers_equal_counts_take_three_values_with_binomial_frequencies():
    # A = (1, 1), B = (0, 0). Two draws: AA -> 1, AB/BA -> 0.5, BB -> 0 with p = 1/4, 1/2, 1/4.
    values, writers = np.array([1.0, 1.0, 0.0, 0.0]), np.array(["A", "A", "B", "B"])
    stats = bootstrap_replicates(values, writers, n_boot=20000, seed=1)[:, 0]
    assert frequencies(stats, [0.0, 0.5, 1.0]).sum() == 1.0  # nothing else occurs
    np.testing.assert_allclose(frequencies(stats, [0.0, 0.5, 1.0]), [0.25, 0.5, 0.25], atol=0.015)
    # 2.5 % and 97.5 % quantiles fall deep inside the runs of 0s and 1s; 30 % and 70 % inside the 0.5s
    np.testing.assert_array_equal(writer_bootstrap(values, writers, 20000, seed=1, level=0.95), [0.0, 1.0])
    np.testing.assert_array_equal(writer_bootstrap(values, writers, 20000, seed=1, level=0.4), [0.5, 0.5])


def test_writer_with_more_queries_weighs_more():
    # A has 3 queries of AP 1, B one of AP 0: AA -> 1, AB -> 3/4 (not 1/2), BB -> 0.
    values, writers = np.array([1.0, 1.0, 1.0, 0.0]), np.array(["A", "A", "A", "B"])
    stats = bootstrap_replicates(values, writers, n_boot=20000, seed=2)[:, 0]
    assert frequencies(stats, [0.0, 0.75, 1.0]).sum() == 1.0
    np.testing.assert_allclose(frequencies(stats, [0.0, 0.75, 1.0]), [0.25, 0.5, 0.25], atol=0.015)


def test_replicates_by_hand_from_explicit_draws():
    # A: 3 queries (.9, .6, .3) sum 1.8; B: 1 query (.2); C: 2 queries (.5, .1) sum 0.6
    values = np.array([0.9, 0.2, 0.6, 0.5, 0.3, 0.1])
    writers = np.array(["A", "B", "A", "C", "A", "C"])
    sums, n = _writer_totals(values[:, None], writers)  # writers in order of first appearance
    np.testing.assert_allclose(sums[:, 0], [1.8, 0.2, 0.6])
    np.testing.assert_array_equal(n, [3, 1, 2])
    draws = np.array([[2, 0, 1],    # A twice, C once: (2*1.8 + 0.6) / (2*3 + 2) = 4.2 / 8
                      [0, 3, 0],    # B three times: 0.2
                      [1, 1, 1]])   # the observed sample: 2.6 / 6
    np.testing.assert_allclose(_replicate_stats(draws, sums, n)[:, 0], [4.2 / 8, 0.2, 2.6 / 6])


def test_public_replicates_are_the_seeded_draws_fed_through_the_formula():
    rng = np.random.default_rng(5)
    values, writers = rng.random(40), rng.integers(0, 7, 40)
    counts = _draw_counts(7, 50, np.random.default_rng(3))
    assert counts.shape == (50, 7) and (counts.sum(axis=1) == 7).all()  # W draws per replicate
    sums, n = _writer_totals(values[:, None], writers)
    np.testing.assert_allclose(bootstrap_replicates(values, writers, n_boot=50, seed=3),
                               _replicate_stats(counts, sums, n))


def test_draw_counts_are_uniform_over_writers():
    counts = _draw_counts(4, 5000, np.random.default_rng(0))
    np.testing.assert_allclose(counts.mean(axis=0), 1.0, atol=0.05)  # E[count] = W * 1/W


# ---- the interval

def test_percentile_definition_is_numpy_linear_by_hand():
    stats = np.array([[3.0], [0.0], [4.0], [1.0], [2.0]])
    # level 0.5 -> q = 0.25, 0.75 -> positions 0.25*4 = 1, 0.75*4 = 3 of the sorted stats
    np.testing.assert_allclose(_percentile_interval(stats, 0.5), [[1.0, 3.0]])
    # level 0.8 -> q = 0.1, 0.9 -> positions 0.4, 3.6: interpolated between neighbours
    np.testing.assert_allclose(_percentile_interval(stats, 0.8), [[0.4, 3.6]])


def test_interval_is_the_quantiles_of_the_replicates():
    rng = np.random.default_rng(0)
    values, writers = rng.random(300), rng.integers(0, 30, 300)
    stats = bootstrap_replicates(values, writers, n_boot=600, seed=4)[:, 0]
    np.testing.assert_allclose(writer_bootstrap(values, writers, n_boot=600, seed=4, level=0.9),
                               np.quantile(stats, [0.05, 0.95], method="linear"))


def test_all_equal_values_collapse_the_interval():
    ci = writer_bootstrap(np.full(12, 0.7), np.repeat(["a", "b", "c"], [2, 3, 7]), n_boot=200)
    np.testing.assert_allclose(ci, [0.7, 0.7], rtol=0, atol=1e-15)


def test_single_writer_collapses_to_the_observed_mean():
    values = np.array([0.1, 0.4, 1.0])
    np.testing.assert_allclose(writer_bootstrap(values, ["w"] * 3, n_boot=100), [0.5, 0.5])


def test_seeded_determinism_and_seed_matters():
    rng = np.random.default_rng(0)
    values, writers = rng.random(500), rng.integers(0, 60, 500)
    n_boot = _BLOCK + 17  # crosses a block boundary
    a = writer_bootstrap(values, writers, n_boot, seed=11)
    np.testing.assert_array_equal(a, writer_bootstrap(values, writers, n_boot, seed=11))
    assert not np.array_equal(a, writer_bootstrap(values, writers, n_boot, seed=12))
    assert a[0] < values.mean() < a[1]


def test_columns_share_draws_and_shapes():
    rng = np.random.default_rng(1)
    values, writers = rng.random((200, 2)), rng.integers(0, 25, 200)
    both = writer_bootstrap(values, writers, n_boot=300, seed=7)
    assert both.shape == (2, 2)
    for j in range(2):  # the draws do not depend on the number of columns
        np.testing.assert_array_equal(both[j], writer_bootstrap(values[:, j], writers, n_boot=300, seed=7))


def test_empty_input_gives_nans():
    assert np.isnan(writer_bootstrap(np.array([]), np.array([]))).all()
    assert writer_bootstrap(np.array([]), np.array([])).shape == (2,)
    empty = writer_bootstrap(np.empty((0, 3)), np.array([]))
    assert empty.shape == (3, 2) and np.isnan(empty).all()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="len\\(writers\\) = 2"):
        writer_bootstrap(np.ones(3), ["a", "b"])
    with pytest.raises(ValueError, match="1 of 3 queries have NaN"):
        writer_bootstrap(np.array([0.1, np.nan, 0.3]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="level"):
        writer_bootstrap(np.ones(3), ["a", "b", "c"], level=95)
    with pytest.raises(ValueError, match="n_boot"):
        writer_bootstrap(np.ones(3), ["a", "b", "c"], n_boot=0)


# ---- per-query tables

def per_query(ids, writers, aps, ranks=None):
    ranks = ranks if ranks is not None else [1] * len(ids)
    return pd.DataFrame({"query_doc_id": ids, "writer": writers, "ap": np.asarray(aps, np.float64),
                         "first_hit_rank": ranks, "n_relevant": 1, "gallery_size": 10})


def test_per_query_metrics_and_intervals():
    table = per_query(["q1", "q2", "q3", "q4"], ["A", "A", "B", "B"], [1.0, 0.5, 0.25, 0.25], [1, 2, 1, 3])
    np.testing.assert_allclose(per_query_metrics(table), [[1.0, 1], [0.5, 0], [0.25, 1], [0.25, 0]])
    out = metric_intervals(table, n_boot=2000, seed=0)
    assert out["n_queries"] == 4 and out["n_writers"] == 2
    assert out["map"] == 0.5 and out["top1"] == 0.5
    # mAP replicates: AA -> 0.75, AB -> 0.5, BB -> 0.25; Top-1: every writer has one hit in two -> 0.5
    assert (out["map_ci_low"], out["map_ci_high"]) == (0.25, 0.75)
    assert (out["top1_ci_low"], out["top1_ci_high"]) == (0.5, 0.5)


def test_paired_comparison_by_hand():
    method = per_query(["q1", "q2", "q3", "q4"], ["A", "A", "B", "B"], [1.0, 0.5, 0.2, 0.3])
    # shuffled rows and one query the method did not score: pairing is by id, not by position
    baseline = per_query(["q4", "q9", "q2", "q1", "q3"], ["B", "C", "A", "A", "B"], [0.1, 0.9, 0.5, 0.5, 0.4])
    out = paired_comparison(method, baseline, n_boot=4000, seed=0)
    # deltas q1..q4: 0.5, 0 (tie), -0.2, 0.2 -> mean 0.125; writer A sums 0.5, B sums 0.0 over 2 each
    assert (out["n_paired"], out["n_method"], out["n_baseline"], out["n_writers"]) == (4, 4, 5, 2)
    assert out["delta_map"] == pytest.approx(0.125)
    assert out["share_improved"] == 0.5 and out["share_worsened"] == 0.25
    # replicates: AA -> 0.25, AB -> 0.125, BB -> 0: the 95 % interval spans the extremes
    assert out["delta_map_ci_low"] == pytest.approx(0.0) and out["delta_map_ci_high"] == pytest.approx(0.25)
    assert out["delta_map_ci_low"] <= out["delta_map"] <= out["delta_map_ci_high"]


def test_identical_tables_are_ties_even_with_float_noise():
    rng = np.random.default_rng(0)
    table = per_query([f"q{i}" for i in range(30)], np.repeat(list("abcde"), 6), rng.random(30))
    out = paired_comparison(table, table.copy(), n_boot=200)
    assert out["delta_map"] == 0.0 and (out["delta_map_ci_low"], out["delta_map_ci_high"]) == (0.0, 0.0)
    assert out["share_improved"] == 0.0 and out["share_worsened"] == 0.0
    noisy = table.assign(ap=table["ap"] + 1e-15)  # the same rankings scored in another order
    out = paired_comparison(noisy, table, n_boot=200)
    assert out["share_improved"] == 0.0 and out["share_worsened"] == 0.0


def test_paired_comparison_errors():
    method = per_query(["q1", "q2", "q3"], ["A", "A", "B"], [1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match=r"method \(3 queries\) and baseline \(2 queries\) share no"):
        paired_comparison(method, per_query(["x1", "x2"], ["A", "B"], [0.1, 0.2]))
    with pytest.raises(ValueError, match=r"disagree on the writer of 1 queries, e\.g\. \['q3'\]"):
        paired_comparison(method, per_query(["q1", "q3"], ["A", "C"], [0.1, 0.2]))
    with pytest.raises(ValueError, match="baseline per-query table lacks columns \\['ap'\\]"):
        paired_comparison(method, method.drop(columns="ap"))
    with pytest.raises(ValueError, match="method per-query table repeats query_doc_id \\['q1'\\]"):
        paired_comparison(pd.concat([method, method.iloc[:1]]), method)
