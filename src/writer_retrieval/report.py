"""Report stage: results/benchmark.parquet (all metrics rows) and a self-contained results/report.html.

The page opens with one pivot per test set (rows: extractor / aggregation [/ encoding], columns: the
rerankers, cells: mAP with its CI and Top-1), then charts drawn at the page width, the per-query AP
distributions, the paired comparisons with the baseline row, training health, binarization quality,
patch clusters, example queries and the provenance of every row."""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from .imaging import load_gray  # noqa: E402
from .storage import atomic_path, write_parquet  # noqa: E402
from .training_health import health_table  # noqa: E402

log = logging.getLogger("writer_retrieval")


ROW_LABELS = ["dataset", "train_on", "features", "aggregation", "encoding", "rerank", "rerank_graph"]
# The rows compared with each other query by query: one test set, one training set, one protocol.
SAME_TEST = ["dataset", "train_on", "exclude_same"]
COMPARISON_COLUMNS = ["baseline", "n_paired", "delta_map", "delta_map_ci_low", "delta_map_ci_high",
                      "share_improved", "share_worsened"]
PIVOT_VALUES = ["map", "map_ci_low", "map_ci_high", "top1"]
# Pivot columns: no reranking first, then the README's rerankers, other names alphabetically after them.
RERANK_ORDER = ["none", "krnn", "sgr", "gnn"]
OTHER_PAGES = " (other pages)"
# Figures are drawn at a fixed 1100 px (11 in at 100 dpi): the page body is at most 1200 px wide with
# 24 px padding, so a 1280 px window shows them unscaled and never scrolls sideways.
FIG_WIDTH, DPI = 11.0, 100
COLOURS = plt.get_cmap("tab10").colors
GREEN, RED, GREY = "#2a9d3a", "#c8322b", "#8c8c8c"


def collect_benchmark(metrics_paths, queries_paths, out_path, baseline: dict,
                      bootstrap: dict) -> tuple[pd.DataFrame, list[str]]:
    """All metrics rows, each with its paired comparison against the baseline row of its test set;
    returns the table and each row's queries.parquet, both in the table's (sorted) order."""
    table = pd.concat([pd.read_parquet(p) for p in metrics_paths], ignore_index=True)
    table = pd.concat([table, paired_comparisons(table, list(queries_paths), baseline, bootstrap)], axis=1)
    order = table.sort_values(ROW_LABELS, kind="stable").index
    table = table.loc[order].reset_index(drop=True)
    write_parquet(table, out_path)
    log.info("benchmark:\n%s", table[["dataset", "features", "aggregation", "rerank", "n_queries", "map", "top1",
                                       "chance_map"]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table, [queries_paths[i] for i in order]


def paired_comparisons(table: pd.DataFrame, queries_paths: list, baseline: dict, bootstrap: dict) -> pd.DataFrame:
    """Per row (in table order, queries_paths alongside): mean AP difference to the baseline row of
    its test set with a writer-bootstrap CI, and the shares of queries improved / worsened. Rows
    without a baseline row in their test set get NaN (and an empty baseline name)."""
    from .bootstrap import paired_comparison

    spec = {"rerank": "none", "encoding": "none", **baseline}
    name = "/".join(spec[k] for k in ("features", "aggregation", "encoding", "rerank"))
    is_baseline = np.logical_and.reduce([table[k] == v for k, v in spec.items()])
    rows = [dict.fromkeys(COMPARISON_COLUMNS, np.nan) | {"baseline": ""} for _ in range(len(table))]
    for _, group in table.groupby(SAME_TEST, sort=False):
        found = group.index[is_baseline[group.index]]
        if len(found) == 0:
            continue
        reference = pd.read_parquet(queries_paths[found[0]])
        for i in group.index:
            result = paired_comparison(pd.read_parquet(queries_paths[i]), reference, bootstrap["replicates"],
                                       bootstrap["seed"], bootstrap["level"])
            rows[i] = {"baseline": name, **{k: result[k] for k in COMPARISON_COLUMNS if k != "baseline"}}
    if not any(r["baseline"] for r in rows):
        log.warning("no row is the baseline %s (report.baseline): no paired comparisons", name)
    return pd.DataFrame(rows, index=table.index)[COMPARISON_COLUMNS]


# --------------------------------------------------------------------------------------------
# Labels, test sets and number formats
# --------------------------------------------------------------------------------------------

def method_labels(table: pd.DataFrame) -> pd.Series:
    """extractor / aggregation, plus the encoding where there is one: the pivot's rows."""
    return pd.Series([" / ".join([f, a] + ([e] if e != "none" else []))
                      for f, a, e in zip(table.features, table.aggregation, table.encoding)], index=table.index,
                     dtype=object)


def rerank_labels(table: pd.DataFrame) -> pd.Series:
    """The pivot's columns: the reranker, rows on the other_pages graph apart from those on all documents."""
    return pd.Series(["no rerank" if r == "none" else r + OTHER_PAGES if g == "other_pages" else r
                      for r, g in zip(table.rerank, table.rerank_graph)], index=table.index, dtype=object)


def _column_key(label: str) -> tuple:
    name = "none" if label == "no rerank" else label.removesuffix(OTHER_PAGES)
    return (RERANK_ORDER.index(name) if name in RERANK_ORDER else len(RERANK_ORDER), label.endswith(OTHER_PAGES),
            name)


def baseline_label(name: str) -> str:
    """report.baseline's row name (features/aggregation/encoding/rerank) as the pivot labels it."""
    features, aggregation, encoding, rerank = name.split("/")
    return " / ".join([features, aggregation] + ([encoding] if encoding != "none" else [])) + (
        f" + {rerank}" if rerank != "none" else "")


def set_title(dataset: str, train_on: str, exclude_same: str) -> str:
    return (dataset + (f", trained on {train_on}" if train_on != dataset else "")
            + (f", same-{exclude_same} documents excluded" if exclude_same != "none" else ""))


def by_test_set(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) of every test set: the rows that are compared with each other."""
    return [(set_title(*key), rows) for key, rows in table.groupby(SAME_TEST, sort=True)]


def pct(value) -> str:
    """A share as a percentage with one decimal ("–" where missing)."""
    return "–" if pd.isna(value) else f"{100 * value:.1f}"


def with_ci(value, low, high) -> str:
    """HTML: the value in %, its confidence interval below it in small print."""
    if pd.isna(value) or pd.isna(low) or pd.isna(high):
        return pct(value)
    return f"{pct(value)}<span class='ci'>[{pct(low)}, {pct(high)}]</span>"


def chance_text(rows: pd.DataFrame) -> str:
    low, high = pct(rows.chance_map.min()), pct(rows.chance_map.max())
    return f"chance mAP (random ranking) {low if low == high else f'{low}–{high}'} %"


def duration(seconds) -> str:
    if pd.isna(seconds):
        return "–"
    if seconds < 1:
        return "<1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------------------------
# The pivot
# --------------------------------------------------------------------------------------------

def pivot(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One test set's rows as method x reranker frames of PIVOT_VALUES: rows by mAP without reranking
    (descending; by the first column when no row is plain), no reranking as the first column."""
    keyed = rows.assign(method=method_labels(rows), column=rerank_labels(rows))
    frames = {v: keyed.pivot_table(index="method", columns="column", values=v, aggfunc="first", dropna=False)
              for v in PIVOT_VALUES}
    columns = sorted(frames["map"].columns, key=_column_key)
    order = frames["map"][columns[0]].sort_values(ascending=False, na_position="last", kind="stable").index
    return {v: f.reindex(index=order, columns=columns) for v, f in frames.items()}


def best_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """True where a cell holds its column's highest value (ties: every one of them)."""
    return frame.eq(frame.max()) & frame.notna()


def _cell(content: str, best: bool) -> str:
    return f"<td class='best'>{content}</td>" if best else f"<td>{content}</td>"


def pivot_html(title: str, rows: pd.DataFrame, table_id: str) -> str:
    """One test set's pivot: mAP % [CI] and Top-1 % per reranker, the best of each column marked, the
    chance mAP and the test set's size in the heading above it."""
    frames = pivot(rows)
    m, top1 = frames["map"], frames["top1"]
    best_map, best_top1 = best_cells(m), best_cells(top1)
    level = 100 * rows.ci_level.iloc[0] if "ci_level" in rows else 95
    head = "".join(f"<th colspan='2' scope='colgroup'>{html.escape(c)}</th>" for c in m.columns)
    sub = f"<th>mAP %<br>[{level:g} % CI]</th><th>Top-1 %</th>" * len(m.columns)
    body = []
    for method in m.index:
        cells = "".join(_cell(with_ci(m.at[method, c], frames["map_ci_low"].at[method, c],
                                      frames["map_ci_high"].at[method, c]), best_map.at[method, c])
                        + _cell(pct(top1.at[method, c]), best_top1.at[method, c]) for c in m.columns)
        body.append(f"<tr><th scope='row'>{html.escape(method)}</th>{cells}</tr>")
    corner = "extractor / aggregation" + (" / encoding" if (rows.encoding != "none").any() else "")
    heading = (f"<h3>{html.escape(title)} <span class='note'>{int(rows.n_queries.max())} queries, "
               f"{int(rows.n_writers.max())} writers; {chance_text(rows)}</span></h3>")
    return (f"{heading}<div class='scroll'><table class='pivot' id='{table_id}'><thead>"
            f"<tr><th rowspan='2' scope='col'>{corner}</th>{head}</tr><tr>{sub}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


PIVOT_LEGEND = ("<p class='legend'>Leave-one-out retrieval on each test split: every test document queries all "
                "the others. Cells: mAP with its confidence interval (bootstrap over writers) and Top-1, in %; "
                "rows sorted by mAP without reranking. <span class='best'>Bold on green</span>: the best value "
                "of its column (ties: all of them). Columns named “(other pages)” rerank on a graph without "
                "same-page documents.</p>")


def pivots_html(table: pd.DataFrame) -> str:
    return "".join(pivot_html(title, rows, f"pivot-{i}")
                   for i, (title, rows) in enumerate(by_test_set(table), 1)) + PIVOT_LEGEND


def write_pivot(table: pd.DataFrame, path) -> None:
    """The pivots alone as a small page (an item of Snakemake's report)."""
    with atomic_path(path, ".html") as tmp:
        tmp.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{CSS}</style></head>"
                       f"<body>{pivots_html(table)}</body></html>")


# --------------------------------------------------------------------------------------------
# Paired comparisons
# --------------------------------------------------------------------------------------------

def _is_baseline(rows: pd.DataFrame) -> pd.Series:
    key = rows.features + "/" + rows.aggregation + "/" + rows.encoding + "/" + rows.rerank
    return key == rows.baseline


def comparison_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """One test set's rows against its baseline row (left out): Δ mAP with its CI in points, the shares
    of queries improved / worsened in %, and mark "better" / "worse" where the CI excludes 0;
    largest Δ first."""
    rows = rows[(rows.baseline != "") & rows.delta_map.notna() & ~_is_baseline(rows)]
    frame = pd.DataFrame({"method": method_labels(rows), "rerank": rerank_labels(rows),
                          "delta": 100 * rows.delta_map, "low": 100 * rows.delta_map_ci_low,
                          "high": 100 * rows.delta_map_ci_high, "improved": 100 * rows.share_improved,
                          "worsened": 100 * rows.share_worsened, "queries": rows.n_paired})
    frame["mark"] = np.select([frame.low > 0, frame.high < 0], ["better", "worse"], "")
    return frame.sort_values("delta", ascending=False, kind="stable").reset_index(drop=True)


SIGN = {"better": " ▲", "worse": " ▼", "": ""}


def comparison_html(title: str, rows: pd.DataFrame) -> str:
    frame = comparison_frame(rows)
    if frame.empty:
        return ""
    base = rows[_is_baseline(rows)]
    lines = [f"<tr class='{r.mark}'><th scope='row'>{html.escape(r.method)}</th><td>{html.escape(r.rerank)}</td>"
             f"<td>{r.delta:+.1f} <span class='ci'>[{r.low:+.1f}, {r.high:+.1f}]</span>{SIGN[r.mark]}</td>"
             f"<td>{r.improved:.1f}</td><td>{r.worsened:.1f}</td><td>{int(r.queries)}</td></tr>"
             for r in frame.itertuples()]
    heading = (f"<h3>{html.escape(title)} <span class='note'>against {baseline_label(rows.baseline.iloc[0])}"
               f" (mAP {pct(base['map'].iloc[0]) if len(base) else '–'} %)</span></h3>")
    return (f"{heading}<div class='scroll'><table class='comparison'><thead><tr>"
            "<th>method</th><th>rerank</th><th>Δ mAP (points) [CI]</th><th>improved %</th><th>worsened %</th>"
            f"<th>paired queries</th></tr></thead><tbody>{''.join(lines)}</tbody></table></div>")


def rerank_graph_table(table: pd.DataFrame) -> pd.DataFrame:
    """Reranked rows of the exclude_same page test sets, the two rerank graphs side by side (mAP %), and
    the points that same-page documents in the graph add."""
    rows = table[(table.exclude_same == "page") & (table.rerank != "none")]
    if rows.empty:
        return pd.DataFrame()
    keys = ["dataset", "train_on", "features", "aggregation", "encoding", "rerank"]
    side = rows.pivot_table(index=keys, columns="rerank_graph", values="map", aggfunc="first") * 100
    side = side.reindex(columns=["all", "other_pages"]).reset_index()
    plain = table[(table.exclude_same == "page") & (table.rerank == "none")].set_index(keys[:-1])["map"] * 100
    out = pd.DataFrame({"test set": [set_title(d, t, "page") for d, t in zip(side.dataset, side.train_on)],
                        "method": method_labels(side), "rerank": side.rerank,
                        "no rerank": [plain.get(tuple(k), np.nan) for k in side[keys[:-1]].to_numpy()],
                        "all test documents": side["all"], "without same-page documents": side["other_pages"]})
    out["same-page gain (points)"] = out["all test documents"] - out["without same-page documents"]
    return out


# --------------------------------------------------------------------------------------------
# Charts (fixed width, one panel per test set)
# --------------------------------------------------------------------------------------------

def _panels(heights: list[float]):
    """A figure at the page width with one stacked panel per height (inches)."""
    heights = heights or [1.0]
    fig, axes = plt.subplots(len(heights), 1, figsize=(FIG_WIDTH, sum(heights)), dpi=DPI, squeeze=False,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    return fig, list(axes[:, 0])


def _save(fig, path) -> None:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)


def _legend_outside(ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def rerank_styles(labels) -> dict[str, dict]:
    """Bar style of every pivot column, the same in every panel: one colour per reranker, hatched on
    the graph without same-page documents."""
    names = list(dict.fromkeys(c.removesuffix(OTHER_PAGES) for c in sorted(set(labels), key=_column_key)))
    return {c: {"color": COLOURS[names.index(c.removesuffix(OTHER_PAGES)) % len(COLOURS)],
                "hatch": "///" if c.endswith(OTHER_PAGES) else None, "edgecolor": "white", "linewidth": 0}
            for c in labels}


def _height(rows: int, per_row: float, legend_entries: int) -> float:
    """Panel height (inches): the rows, the axis and title, and room for a legend beside it."""
    return max(0.9 + rows * per_row, 0.5 + 0.16 * legend_entries)


def map_chart(table: pd.DataFrame, path) -> None:
    """mAP as horizontal bars, one group per method (best first), one bar per reranker, CI whiskers and
    the chance mAP dashed; one panel per test set."""
    sets = [(title, pivot(rows), rows.chance_map.mean()) for title, rows in by_test_set(table)]
    styles = rerank_styles(rerank_labels(table))
    fig, axes = _panels([_height(len(f["map"]), 0.14 * f["map"].shape[1] + 0.1, f["map"].shape[1] + 1)
                         for _, f, _ in sets])
    for ax, (title, frames, chance) in zip(axes, sets):
        m = frames["map"]
        y, h = np.arange(len(m)), 0.8 / m.shape[1]
        for j, col in enumerate(m.columns):
            pos, value = y - 0.4 + h * (j + 0.5), 100 * m[col].to_numpy()
            err = 100 * np.abs(frames["map_ci_low"][col].to_numpy() - m[col].to_numpy()), \
                100 * np.abs(frames["map_ci_high"][col].to_numpy() - m[col].to_numpy())
            ax.barh(pos, np.nan_to_num(value), height=h, label=col, xerr=np.nan_to_num(np.vstack(err)),
                    error_kw={"lw": 0.7, "capsize": 1.5}, **styles[col])
            for p, v, e in zip(pos, value, err[1]):
                if not np.isnan(v):
                    ax.text(v + np.nan_to_num(e) + 0.8, p, f"{v:.1f}", va="center", fontsize=7)
        ax.axvline(100 * chance, ls="--", lw=0.9, color="black", label="chance mAP")
        ax.set_yticks(y, m.index, fontsize=8)
        ax.set_ylim(len(m) - 0.5, -0.5)  # best first, no margin above or below the groups
        ax.set_xlim(0, 112)
        ax.set_xlabel("mAP % (whiskers: confidence interval)", fontsize=8)
        ax.set_title(title, loc="left", fontsize=10)
        _legend_outside(ax)
    _save(fig, path)


def ap_distribution(table: pd.DataFrame, queries_paths: list, path, max_dots: int = 300) -> None:
    """Per-query AP of every row (box: quartiles, whiskers: 1.5 IQR; dots: up to max_dots queries;
    diamond: mAP), methods sorted by mAP; one panel per test set."""
    queries = pd.Series(list(queries_paths), index=table.index)
    sets = by_test_set(table)
    fig, axes = _panels([_height(len(rows), 0.24, 2) for _, rows in sets])
    rng = np.random.default_rng(0)  # the same dots on every run
    for ax, (title, rows) in zip(axes, sets):
        rows = rows.sort_values("map", ascending=False, kind="stable")
        labels = [m if r == "no rerank" else f"{m} + {r}" for m, r in zip(method_labels(rows), rerank_labels(rows))]
        aps = [100 * pd.read_parquet(queries[i], columns=["ap"]).ap.to_numpy() for i in rows.index]
        y = np.arange(1, len(aps) + 1)
        ax.boxplot(aps, positions=y, orientation="horizontal", widths=0.6, showfliers=False, tick_labels=labels,
                   medianprops={"color": "black"})
        for yi, ap in zip(y, aps):
            shown = ap if len(ap) <= max_dots else rng.choice(ap, max_dots, replace=False)
            ax.scatter(shown, yi + rng.uniform(-0.22, 0.22, len(shown)), s=5, alpha=0.35, color=COLOURS[0], lw=0)
        ax.scatter(100 * rows["map"], y, marker="D", s=20, color=RED, zorder=3, label="mAP")
        ax.axvline(100 * rows.chance_map.mean(), ls="--", lw=0.9, color="black", label="chance mAP")
        ax.invert_yaxis()
        ax.set_xlim(-2, 102)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlabel("AP of one query (%)", fontsize=8)
        ax.set_title(title, loc="left", fontsize=10)
        _legend_outside(ax)
    _save(fig, path)


def comparison_chart(table: pd.DataFrame, path) -> None:
    """Δ mAP against the baseline row with its CI per method (green / red: the CI excludes 0); one
    panel per test set that has a baseline row."""
    sets = [(title, rows.baseline.iloc[0], comparison_frame(rows)) for title, rows in by_test_set(table)]
    sets = [s for s in sets if not s[2].empty]
    fig, axes = _panels([_height(len(f), 0.22, 0) for *_, f in sets])
    if not sets:
        axes[0].text(0.5, 0.5, "no paired comparisons: no test set has the baseline row (report.baseline)",
                     ha="center", va="center")
        axes[0].axis("off")
    for ax, (title, baseline, frame) in zip(axes, sets):
        y = np.arange(len(frame))
        colours = frame.mark.map({"better": GREEN, "worse": RED, "": GREY}).tolist()
        ax.hlines(y, frame.low, frame.high, colors=colours, lw=1.5)
        ax.scatter(frame.delta, y, color=colours, s=18, zorder=3)
        ax.axvline(0, color="black", lw=0.8)
        labels = [m if r == "no rerank" else f"{m} + {r}" for m, r in zip(frame.method, frame.rerank)]
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_ylim(len(frame) - 0.5, -0.5)
        ax.set_xlabel("Δ mAP against the baseline (points; bars: confidence interval)", fontsize=8)
        ax.set_title(f"{title}: against {baseline_label(baseline)}", loc="left", fontsize=10)
    _save(fig, path)


def stage_times(table: pd.DataFrame) -> pd.DataFrame:
    """Job seconds per stage of every extractor's path (rows: test data, extractor / aggregation
    [/ encoding]): shared stages once, reranking and retrieval summed over the path's rows."""
    stages = [c for c in table.columns if c.startswith("seconds_") and table[c].notna().any()]
    where = [d if d == t else f"{d} (trained on {t})" for d, t in zip(table.dataset, table.train_on)]
    keyed = table.assign(path=[f"{w}: {m}" for w, m in zip(where, method_labels(table))])
    summed = ("seconds_rerank", "seconds")
    spec = {c: (lambda s: s.sum(min_count=1)) if c in summed else "max" for c in [*stages, "seconds"]}
    times = keyed.groupby("path", sort=False).agg(spec)
    return times.rename(columns=lambda c: "retrieval" if c == "seconds" else c.removeprefix("seconds_"))


def stage_time_chart(times: pd.DataFrame, path) -> None:
    """Stacked horizontal bars of stage_times, one bar per extractor's path."""
    fig, (ax,) = _panels([_height(len(times), 0.26, times.shape[1])])
    colours = plt.get_cmap("tab20").colors
    scale, unit = (60, "min") if times.sum(axis=1).max() >= 120 else (1, "s")
    y, left = np.arange(len(times)), np.zeros(len(times))
    for j, stage in enumerate(times.columns):
        width = times[stage].fillna(0).to_numpy() / scale
        ax.barh(y, width, left=left, color=colours[j % len(colours)], label=stage, height=0.7)
        left += width
    ax.set_yticks(y, times.index, fontsize=8)
    ax.set_ylim(len(times) - 0.5, -0.5)
    ax.set_xlabel(f"job time per stage ({unit}, summed over the stage's jobs)", fontsize=8)
    ax.set_title("Where the time went", loc="left", fontsize=10)
    _legend_outside(ax)
    _save(fig, path)


def loss_curves(logs: dict[str, str], path) -> None:
    """Training loss per epoch of every training run ({label: log.parquet}), one panel per run
    (AttMask, pretext cross-entropy, masked-HOG MSE and multi-similarity losses have unrelated scales)."""
    n = max(len(logs), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(FIG_WIDTH, 2.8 * rows), dpi=DPI, squeeze=False,
                             layout="constrained")
    for ax, (label, log_path) in zip(axes.ravel(), logs.items()):
        _loss_panel(ax, pd.read_parquet(log_path))
        ax.set_title(label, fontsize=9)
    for ax in axes.ravel()[len(logs):]:
        ax.axis("off")
    fig.suptitle("Training runs (loss per epoch)" if logs else "No training run in this grid", fontsize=10)
    _save(fig, path)


def _loss_panel(ax, table: pd.DataFrame) -> None:
    ax.plot(table.epoch, table.loss, marker="o", ms=3, label="loss")
    for part in ("loss_cls", "loss_patch"):
        if part in table:
            ax.plot(table.epoch, table[part], ls="--", lw=1, label=part[5:])
    if "loss_mean_hog" in table:  # SAGHOG: what predicting the batch's mean HOG scores
        ax.plot(table.epoch, table.loss_mean_hog, ls=":", color="gray", label="mean-HOG baseline")
    if "accuracy" in table:  # pretext tasks: share of transformations recognised, against chance
        twin = ax.twinx()
        twin.plot(table.epoch, table.accuracy, color="tab:green", lw=1, label="accuracy")
        twin.plot(table.epoch, table.chance, color="tab:green", ls=":", lw=1)
        twin.set_ylim(0, 1)
        twin.set_ylabel("accuracy (dotted: chance)", fontsize=8, color="tab:green")
    if "teacher_entropy_cls" in table:  # AttMask: a teacher near uniform has nothing to teach
        twin = ax.twinx()
        twin.plot(table.epoch, table.teacher_entropy_cls, color="tab:purple", lw=1)
        twin.plot(table.epoch, table.uniform_entropy_cls, color="tab:purple", ls=":", lw=1)
        twin.set_ylim(0, 1.05 * float(table.uniform_entropy_cls.max()))
        twin.set_ylabel("teacher [CLS] entropy (dotted: uniform)", fontsize=8, color="tab:purple")
    ax.set_xlabel("epoch", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="upper right")


# --------------------------------------------------------------------------------------------
# Example queries
# --------------------------------------------------------------------------------------------

def _thumbnail(path: str, height: int, colour: str | None) -> str:
    gray = load_gray(path)
    im = Image.fromarray(gray)
    im = im.resize((max(1, round(im.width * height / im.height)), height), Image.Resampling.LANCZOS).convert("RGB")
    if colour:
        im = ImageOps.expand(im, border=4, fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()


def example_rankings(rankings_path, index_path, n_queries: int, height: int) -> str:
    """HTML rows: query + top 5 thumbnails, relevant ones framed green, others red."""
    if n_queries == 0:
        return ""
    rankings = pd.read_parquet(rankings_path)
    index = pd.read_parquet(index_path).set_index("doc_id")
    queries = rankings.query_doc_id.drop_duplicates().to_numpy()
    chosen = queries[np.linspace(0, len(queries) - 1, min(n_queries, len(queries))).round().astype(int)]
    rows = []
    for q in chosen:
        top = rankings[rankings.query_doc_id == q].sort_values("rank").head(5)
        cells = [f'<td><img src="data:image/jpeg;base64,{_thumbnail(index.loc[q, "path"], height, "#555")}"><br>'
                 f"<b>query</b> {html.escape(q)}<br>writer {html.escape(str(index.loc[q, 'writer']))}</td>"]
        for r in top.itertuples():
            colour = GREEN if r.relevant else RED
            cells.append(f'<td><img src="data:image/jpeg;base64,{_thumbnail(index.loc[r.doc_id, "path"], height, colour)}">'
                         f"<br>#{r.rank} {html.escape(r.doc_id)}<br>writer {html.escape(str(index.loc[r.doc_id, 'writer']))}"
                         f", score {r.score:.3f}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table class='ranks'>" + "".join(rows) + "</table>"


# --------------------------------------------------------------------------------------------
# Sections of report.html: (id, title, html) or None when there is nothing to show
# --------------------------------------------------------------------------------------------

def _img(path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<p><img src='data:image/png;base64,{data}' alt='{html.escape(alt)}'></p>"


def _frame_html(frame: pd.DataFrame, css: str, float_format=lambda v: f"{v:.1f}") -> str:
    """A plain table: underscores in headers become spaces (so that they wrap), numbers formatted."""
    frame = frame.rename(columns=lambda c: str(c).replace("_", " "))
    table = frame.to_html(index=False, border=0, classes=css, na_rep="–", float_format=float_format)
    return f"<div class='scroll'>{table}</div>"


def glance_section(table: pd.DataFrame, chart) -> tuple[str, str, str]:
    return "glance", "Results at a glance", pivots_html(table) + _img(chart, "mAP per method and reranker")


def distribution_section(chart) -> tuple[str, str, str]:
    text = ("<p class='legend'>Average precision of every query: a method whose mAP rests on a few easy "
            "writers has a wide box. Box: quartiles; whiskers: 1.5 × IQR; dots: the queries (at most 300 "
            "per method); red diamond: mAP; dashed: chance mAP.</p>")
    return "queries", "Per-query AP", text + _img(chart, "per-query AP per method")


def comparison_section(table: pd.DataFrame, chart) -> tuple[str, str, str] | None:
    """The paired comparisons (where a test set has the baseline row) and the rerank-graph table of the
    fragment sets."""
    tables = "".join(comparison_html(title, rows) for title, rows in by_test_set(table))
    text = ("<p class='legend'>Every row against the baseline row of its test set, query by query: mean "
            "difference of AP in points with its paired bootstrap interval over writers, and the shares of "
            "queries whose AP rose / fell. <span class='better'>Green ▲</span> / <span class='worse'>red ▼"
            "</span>: the interval excludes 0; other rows the test set cannot tell apart from the "
            "baseline.</p>")
    parts = [text, tables, _img(chart, "paired differences against the baseline")] if tables else []
    graphs = rerank_graph_table(table)
    if not graphs.empty:
        parts += ["<h3>Fragments: rerank graph with all test documents and without same-page documents "
                  "(mAP %)</h3>", _frame_html(graphs, "graphs")]
    return ("comparisons", "Paired comparisons with the baseline", "".join(parts)) if parts else None


def training_section(runs: dict[str, str], losses) -> tuple[str, str, str] | None:
    """Health table (last epoch; flags) and loss curves of the runs that trained."""
    if not runs:
        return None
    health = _frame_html(health_table(runs), "health", float_format=lambda v: f"{v:.4g}")
    return ("training", "Pretraining and fine-tuning",
            "<h3>Training health (last epoch; flags name runs that look collapsed or at chance)</h3>"
            + health + _img(losses, "training loss per epoch"))


def quality_section(paths: list[str]) -> tuple[str, str, str] | None:
    parts = [f"<h3>{html.escape(p.split('/')[-3])}</h3>"
             + _frame_html(pd.read_parquet(p), "quality", float_format=lambda v: f"{v:.3f}") for p in paths]
    return ("binarization", "Binarization quality against ground truth", "".join(parts)) if parts else None


def cluster_section(pngs: list[str], summaries: list[str]) -> tuple[str, str, str] | None:
    parts = []
    for png, summary_path in zip(pngs, summaries):
        summary = json.loads(Path(summary_path).read_text())
        dataset, variant = png.split("/")[-4], png.split("/")[-2]
        parts += [f"<h3>{html.escape(dataset)}: patch clusters ({html.escape(variant)})</h3>",
                  f"<p class='legend'>Pseudo labels for SAGHOG fine-tuning: each row shows patches of one k-means "
                  f"cluster (cluster id at the left); patches of one cluster should look alike. "
                  f"{summary['n_patches']} patches, {100 * summary['ambiguous_share']:.1f}% dropped as ambiguous, "
                  f"median cluster size {summary['median_cluster_size']}.</p>", _img(png, "patch clusters")]
    return ("clusters", "Patch clusters", "".join(parts)) if parts else None


def examples_section(experiments: list[dict], settings: dict) -> tuple[str, str, str] | None:
    """experiments: dicts with dataset, folder, rankings (path), index (path); the first one of each
    dataset shows its example queries."""
    by_dataset: dict[str, dict] = {}
    for exp in experiments:
        by_dataset.setdefault(exp["dataset"], exp)
    parts = []
    for dataset, exp in by_dataset.items():
        fragment = example_rankings(exp["rankings"], exp["index"], settings["queries_shown"],
                                    settings["thumbnail_height"])
        if fragment:
            parts += [f"<h3>{html.escape(dataset)}: example queries ({html.escape(exp['folder'])})</h3>", fragment]
    if not parts:
        return None
    legend = "<p class='legend'>Query, then the top 5; green frame = same writer, red = other writer.</p>"
    return "examples", "Example queries", legend + "".join(parts)


def provenance_section(table: pd.DataFrame, times: pd.DataFrame, chart, run_settings: str,
                       report_code: str) -> tuple[str, str, str]:
    """Devices, code versions, per-row hashes, stage times and the run's result settings (YAML)."""
    where = [set_title(*k) for k in table[SAME_TEST].itertuples(index=False)]
    rows = pd.DataFrame({"test set": where, "method": method_labels(table), "rerank": rerank_labels(table),
                         "settings hash": table.settings_hash, "code version": table.code_version,
                         "device": table.device})
    devices = ", ".join(f"{html.escape(str(d))} ({n} rows)" for d, n in table.device.value_counts().items())
    shown = times.map(duration)
    parts = [f"<p>Devices: {devices}. Code versions: {table.code_version.nunique()} across the rows "
             f"(a row's version covers every stage on its path); report code {html.escape(report_code)}.</p>",
             "<details><summary>Settings hash, code version and device of every row</summary>",
             _frame_html(rows, "provenance"), "</details>", _img(chart, "job time per stage"),
             "<details><summary>Job time per stage of every extractor's path</summary>",
             _frame_html(shown.reset_index().rename(columns={"path": "test data: extractor"}), "times"),
             "</details><details><summary>Config of the run (result settings; execution settings such as "
             "devices, batch sizes and workers are left out)</summary>",
             f"<pre>{html.escape(run_settings)}</pre></details>"]
    return "provenance", "Provenance", "".join(parts)


CSS = """*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;line-height:1.4;max-width:1200px;
margin:0 auto;padding:0 24px 48px}
img{max-width:100%;height:auto}
nav{font-size:13px;margin-bottom:8px}nav a{margin-right:14px}
h2{margin-top:1.8em;border-bottom:2px solid #ddd;padding-bottom:2px}h3{font-size:15px;margin:1.2em 0 .4em}
.scroll{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;margin:6px 0 14px}
td,th{padding:3px 8px;border-bottom:1px solid #ddd;font-size:13px;vertical-align:top}
td{text-align:right;font-variant-numeric:tabular-nums}
th{text-align:center;background:#f3f4f6;font-weight:600}
tbody th,td:first-child{text-align:left}tbody th{background:none;font-weight:normal;white-space:nowrap}
.note{font-weight:normal;color:#555;font-size:13px}
.ci{display:block;color:#666;font-size:11px;font-weight:normal}
.comparison .ci{display:inline}
.best{font-weight:bold;background:#d9efd5}
.better td,span.better{background:#d9efd5}.worse td,span.worse{background:#f7d9d7}
.legend{font-size:12px;color:#444;max-width:900px}
.health td:last-child{text-align:left;min-width:18em}
.provenance td{text-align:left;font-family:monospace}
.ranks{table-layout:fixed;width:100%}
.ranks td{text-align:center;border:none;font-size:11px;overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f7f7f7;padding:8px;font-size:12px}
summary{cursor:pointer;margin:6px 0}"""


def write_report(sections: list[tuple[str, str, str]], out_path) -> None:
    """The page: a table of contents, then the sections in order."""
    nav = "".join(f"<a href='#{sid}'>{html.escape(title)}</a>" for sid, title, _ in sections)
    body = "".join(f"<section id='{sid}'><h2>{html.escape(title)}</h2>{content}</section>"
                   for sid, title, content in sections)
    with atomic_path(out_path, ".html") as tmp:
        tmp.write_text("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                       "<meta name='viewport' content='width=device-width, initial-scale=1'>"
                       f"<title>writer-retrieval report</title><style>{CSS}</style></head><body>"
                       f"<h1>writer-retrieval benchmark</h1><nav>{nav}</nav>{body}</body></html>")
    log.info("report written to %s", out_path)
