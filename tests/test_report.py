"""The report's tables and charts (writer_retrieval.report) on small hand-made benchmark tables."""
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from writer_retrieval import report as R

# A figure must fit a 1280 px window with margins to spare (the page itself pads 24 px each side).
FITS = 1280 - 2 * 40


def row(features, rerank="none", m=0.5, top1=0.6, graph=None, exclude="none", aggregation="vlad", encoding="none",
        delta=np.nan, ci=(np.nan, np.nan), **extra) -> dict:
    """One metrics row of dataset "d": CI of mAP 5 points below, 4 above; chance mAP 5 %."""
    return {"dataset": "d", "train_on": "d", "features": features, "aggregation": aggregation,
            "encoding": encoding, "rerank": rerank, "rerank_graph": graph or ("none" if rerank == "none" else "all"),
            "exclude_same": exclude, "n_queries": 40, "n_writers": 10, "map": m, "map_ci_low": m - 0.05,
            "map_ci_high": m + 0.04, "top1": top1, "ci_level": 0.95, "chance_map": 0.05,
            "baseline": "sift/vlad/none/none", "n_paired": 40, "delta_map": delta, "delta_map_ci_low": ci[0],
            "delta_map_ci_high": ci[1], "share_improved": 0.25, "share_worsened": 0.125, **extra}


@pytest.fixture
def grid() -> pd.DataFrame:
    return pd.DataFrame([row("sift", m=0.80, top1=0.90), row("sift", "krnn", m=0.90, top1=0.97),
                         row("vit", m=0.60, top1=0.70), row("vit", "krnn", m=0.95, top1=0.93),
                         row("saghog", m=0.70, top1=0.75, aggregation="sum"), row("sift", "sgr", m=0.85, top1=0.97)])


def test_pivot_rows_follow_plain_map_and_columns_start_without_reranking(grid):
    frames = R.pivot(grid)
    assert list(frames["map"].index) == ["sift / vlad", "saghog / sum", "vit / vlad"]
    assert list(frames["map"].columns) == ["no rerank", "krnn", "sgr"]
    assert frames["map"].at["vit / vlad", "krnn"] == 0.95
    assert np.isnan(frames["map"].at["saghog / sum", "krnn"])  # not run: an empty cell
    assert frames["map_ci_low"].at["sift / vlad", "no rerank"] == pytest.approx(0.75)


def test_the_best_cell_of_each_column_is_marked(grid):
    best = R.best_cells(R.pivot(grid)["map"])
    assert best.to_dict("list") == {"no rerank": [True, False, False], "krnn": [False, False, True],
                                    "sgr": [True, False, False]}
    page = R.pivot_html("d", grid, "pivot-1")
    marked = re.findall(r"<td class='best'>([^<]*)", page)
    # mAP and Top-1 columns each mark their best: sift plain (80.0 / 90.0), vit krnn (95.0),
    # sift krnn Top-1 (97.0), sift sgr (85.0 / 97.0)
    assert marked == ["80.0", "90.0", "97.0", "85.0", "97.0", "95.0"]
    assert "<td>90.0<span class='ci'>[85.0, 94.0]</span></td>" in page  # sift krnn mAP: not the best


def test_ties_are_all_marked():
    table = pd.DataFrame([row("a", m=1.0), row("b", m=1.0), row("c", m=0.5)])
    assert R.best_cells(R.pivot(table)["map"])["no rerank"].tolist() == [True, True, False]


def test_chance_is_stated_once_per_table_with_the_test_set_size(grid):
    page = R.pivot_html("d", grid, "pivot-1")
    assert page.count("chance mAP") == 1
    assert "40 queries, 10 writers; chance mAP (random ranking) 5.0 %" in page
    assert "<th>mAP %<br>[95 % CI]</th><th>Top-1 %</th>" in page
    assert "id='pivot-1'" in page and "class='pivot'" in page


def test_numbers_have_one_decimal_and_the_ci_below():
    assert R.with_ci(0.91234, 0.88149, 0.94) == "91.2<span class='ci'>[88.1, 94.0]</span>"
    assert R.with_ci(0.5, np.nan, np.nan) == "50.0"
    assert R.pct(np.nan) == "–" and R.pct(0.0749) == "7.5"
    assert R.chance_text(pd.DataFrame({"chance_map": [0.074, 0.081]})) == "chance mAP (random ranking) 7.4–8.1 %"


def test_fragment_sets_get_their_own_pivot_with_other_pages_columns_apart(grid):
    page_rows = pd.DataFrame([row("sift", m=0.4, exclude="page"), row("sift", "sgr", m=0.7, exclude="page"),
                              row("sift", "sgr", m=0.5, graph="other_pages", exclude="page"),
                              row("sift", "krnn", m=0.45, graph="other_pages", exclude="page")])
    table = pd.concat([grid, page_rows], ignore_index=True)
    sets = R.by_test_set(table)
    assert [t for t, _ in sets] == ["d", "d, same-page documents excluded"]
    assert list(R.pivot(sets[1][1])["map"].columns) == ["no rerank", "krnn (other pages)", "sgr",
                                                         "sgr (other pages)"]
    page = R.pivots_html(table)
    assert page.count("<table class='pivot'") == 2 and "id='pivot-2'" in page


def test_rerank_graph_table_puts_both_graphs_side_by_side():
    table = pd.DataFrame([row("sift", m=0.5, exclude="page"), row("sift", "sgr", m=0.7, exclude="page"),
                          row("sift", "sgr", m=0.6, graph="other_pages", exclude="page"), row("sift", m=0.9)])
    graphs = R.rerank_graph_table(table)
    assert graphs.to_dict("records") == [{"test set": "d, same-page documents excluded", "method": "sift / vlad",
                                          "rerank": "sgr", "no rerank": 50.0, "all test documents": 70.0,
                                          "without same-page documents": 60.0,
                                          "same-page gain (points)": pytest.approx(10.0)}]
    assert R.rerank_graph_table(table[table.exclude_same == "none"]).empty


def comparisons() -> pd.DataFrame:
    return pd.DataFrame([row("sift", m=0.8, delta=0.0, ci=(0.0, 0.0)),
                         row("vit", m=0.7, delta=-0.02, ci=(-0.05, 0.01)),
                         row("sift", "krnn", m=0.83, delta=0.03, ci=(0.01, 0.05)),
                         row("saghog", m=0.6, delta=-0.2, ci=(-0.26, -0.15), aggregation="sum")])


def test_comparison_marks_the_rows_whose_interval_excludes_zero():
    frame = R.comparison_frame(comparisons())
    # the baseline row itself is left out; largest difference first, in points
    assert frame[["method", "rerank", "mark"]].values.tolist() == [["sift / vlad", "krnn", "better"],
                                                                   ["vit / vlad", "no rerank", ""],
                                                                   ["saghog / sum", "no rerank", "worse"]]
    assert frame.delta.tolist() == pytest.approx([3.0, -2.0, -20.0])
    assert frame.improved.tolist() == [25.0] * 3 and frame.worsened.tolist() == [12.5] * 3
    page = R.comparison_html("d", comparisons())
    assert "<tr class='better'><th scope='row'>sift / vlad</th><td>krnn</td><td>+3.0 " \
           "<span class='ci'>[+1.0, +5.0]</span> ▲</td><td>25.0</td><td>12.5</td><td>40</td></tr>" in page
    assert page.count("▲") == 1 and page.count("▼") == 1 and "<tr class=''>" in page
    assert "against sift / vlad (mAP 80.0 %)" in page


def test_no_comparison_without_a_baseline_row_but_the_rerank_graphs_still_shown():
    table = comparisons().assign(baseline="", delta_map=np.nan)
    assert R.comparison_html("d", table) == "" and R.comparison_section(table, "unused.png") is None
    fragments = pd.DataFrame([row("sift", m=0.5, exclude="page"), row("sift", "sgr", m=0.7, exclude="page"),
                              row("sift", "sgr", m=0.6, graph="other_pages", exclude="page")])
    sid, _, page = R.comparison_section(fragments.assign(baseline="", delta_map=np.nan), "unused.png")
    assert sid == "comparisons" and "rerank graph" in page and "<td>10.0</td>" in page
    assert "<img" not in page  # no comparison chart without comparisons


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_charts_are_drawn_at_a_fixed_width_that_fits_the_page(grid, tmp_path):
    many = pd.DataFrame([row(f"x{i}", r, m=i / 40) for i in range(30) for r in ("none", "krnn", "sgr", "gnn")])
    for name, table in (("few", grid), ("many", many)):
        R.map_chart(table, tmp_path / f"{name}.png")
        R.comparison_chart(table.assign(delta_map=0.01, delta_map_ci_low=0.0, delta_map_ci_high=0.02),
                           tmp_path / f"{name}-cmp.png")
        for chart in (f"{name}.png", f"{name}-cmp.png"):
            width, _ = png_size(tmp_path / chart)
            assert width == R.FIG_WIDTH * R.DPI == 1100 <= FITS
    assert png_size(tmp_path / "many.png")[1] > png_size(tmp_path / "few.png")[1]  # it grows down, not sideways
    R.loss_curves({}, tmp_path / "losses.png")
    assert png_size(tmp_path / "losses.png")[0] == 1100


def queries_table(aps, writers) -> pd.DataFrame:
    return pd.DataFrame({"query_doc_id": [f"q{i}" for i in range(len(aps))], "writer": writers, "ap": aps})


def test_distribution_plot_reads_each_rows_queries(tmp_path, grid):
    rows = grid.iloc[:3]
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"queries{i}.parquet")
        queries_table(np.linspace(0.1 * i, 1, 8), ["a"] * 4 + ["b"] * 4).to_parquet(paths[-1])
    R.ap_distribution(rows, [str(p) for p in paths], tmp_path / "ap.png")
    # one panel, 3 rows: 0.9 in + 3 x 0.24 in at 100 dpi
    assert png_size(tmp_path / "ap.png") == (1100, 162)
    with pytest.raises(FileNotFoundError):
        R.ap_distribution(rows, [str(tmp_path / "missing.parquet")] * 3, tmp_path / "none.png")


def test_stage_times_count_shared_stages_once_and_sum_reranking():
    paths = [("none", 1.0, np.nan), ("krnn", 2.0, 3.0), ("sgr", 1.5, 5.0)]  # reranker, retrieval s, rerank s
    table = pd.DataFrame([row("sift", r, seconds=s, seconds_features=20.0, seconds_rerank=rr, seconds_pretrain=np.nan)
                          for r, s, rr in paths])
    times = R.stage_times(table)
    assert times.to_dict("index") == {"d: sift / vlad": {"features": 20.0, "rerank": 8.0, "retrieval": 4.5}}
    assert [R.duration(s) for s in (0.4, 42, 300, 9000, np.nan)] == ["<1 s", "42 s", "5.0 min", "2.5 h", "–"]


def test_provenance_lists_devices_hashes_and_the_config(grid, tmp_path):
    table = grid.assign(settings_hash="0123456789", code_version="abcdef0123", device="cpu", seconds=1.0)
    chart = tmp_path / "times.png"
    R.stage_time_chart(R.stage_times(table), chart)
    sid, title, page = R.provenance_section(table, R.stage_times(table), chart, "shard_size: 64\n", "c0de")
    assert (sid, title) == ("provenance", "Provenance")
    assert "Devices: cpu (6 rows). Code versions: 1 across the rows" in page and "report code c0de" in page
    assert page.count("0123456789") == 6 and "<pre>shard_size: 64\n</pre>" in page


def test_the_page_has_a_table_of_contents_and_fits_its_images(tmp_path):
    R.write_report([("glance", "Results at a glance", "<p>x</p>"), ("provenance", "Provenance", "<p>y</p>")],
                   tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "<nav><a href='#glance'>Results at a glance</a><a href='#provenance'>Provenance</a></nav>" in page
    assert "<section id='provenance'><h2>Provenance</h2><p>y</p></section>" in page
    assert "img{max-width:100%;height:auto}" in page and "max-width:1200px" in page


def test_collect_benchmark_returns_each_rows_queries_in_table_order(tmp_path):
    metrics, queries = [], []
    for name, ap in (("vit", [0.5, 0.25, 1.0, 0.5]), ("sift", [1.0, 0.5, 1.0, 1.0])):
        m = {k: v for k, v in row(name).items() if k not in R.COMPARISON_COLUMNS}
        metrics.append(tmp_path / f"{name}-metrics.parquet")
        pd.DataFrame([m]).to_parquet(metrics[-1])
        queries.append(str(tmp_path / f"{name}-queries.parquet"))
        queries_table(ap, ["a", "a", "b", "b"]).to_parquet(queries[-1])
    table, ordered = R.collect_benchmark(metrics, queries, tmp_path / "benchmark.parquet",
                                         {"features": "sift", "aggregation": "vlad"},
                                         {"replicates": 50, "seed": 0, "level": 0.95})
    assert table.features.tolist() == ["sift", "vit"] and ordered == queries[::-1]
    assert table.delta_map.tolist() == pytest.approx([0.0, -0.3125])
    assert pd.read_parquet(tmp_path / "benchmark.parquet").features.tolist() == ["sift", "vit"]
