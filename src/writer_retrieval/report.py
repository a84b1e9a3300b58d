"""Report stage: results/benchmark.parquet (all metrics rows) and a self-contained results/report.html."""
from __future__ import annotations

import base64
import html
import io
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from .imaging import load_gray  # noqa: E402
from .storage import atomic_path, write_parquet  # noqa: E402

log = logging.getLogger("writer_retrieval")


ROW_LABELS = ["dataset", "train_on", "features", "aggregation", "encoding", "rerank", "rerank_graph"]
# The rows compared with each other query by query: one test set, one training set, one protocol.
SAME_TEST = ["dataset", "train_on", "exclude_same"]
COMPARISON_COLUMNS = ["baseline", "n_paired", "delta_map", "delta_map_ci_low", "delta_map_ci_high",
                      "share_improved", "share_worsened"]


def collect_benchmark(metrics_paths, queries_paths, out_path, baseline: dict, bootstrap: dict) -> pd.DataFrame:
    """All metrics rows, each with its paired comparison against the baseline row of its test set."""
    table = pd.concat([pd.read_parquet(p) for p in metrics_paths], ignore_index=True)
    table = pd.concat([table, paired_comparisons(table, list(queries_paths), baseline, bootstrap)], axis=1)
    table = table.sort_values(ROW_LABELS, kind="stable").reset_index(drop=True)
    write_parquet(table, out_path)
    log.info("benchmark:\n%s", table[["dataset", "features", "aggregation", "rerank", "n_queries", "map", "top1",
                                       "chance_map"]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table


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


def rerank_graph_table(table: pd.DataFrame) -> pd.DataFrame:
    """Reranked rows of the exclude_same page test sets, the two rerank graphs side by side (mAP %)."""
    rows = table[(table.exclude_same == "page") & (table.rerank != "none")]
    if rows.empty:
        return rows
    keys = ["dataset", "train_on", "features", "aggregation", "encoding", "rerank"]
    side = rows.pivot_table(index=keys, columns="rerank_graph", values="map", aggfunc="first") * 100
    plain = table[(table.exclude_same == "page") & (table.rerank == "none")].set_index(keys[:-1])["map"] * 100
    side.insert(0, "no rerank", [plain.get(k[:-1], np.nan) for k in side.index])
    return side.reset_index()


def bar_chart(table: pd.DataFrame, path) -> None:
    """mAP and Top-1 per experiment, with the chance mAP of its test set as a tick."""
    labels = ["\n".join([r.dataset, "/".join(v for v in (r.features, r.aggregation, r.encoding, r.rerank)
                                                if v != "none")]) for r in table.itertuples()]
    x = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(table) + 2), 4.0), dpi=110)
    ax.bar(x - 0.2, 100 * table["map"], width=0.4, label="mAP", color="#3b6ea8",
           yerr=100 * np.abs(table[["map_ci_low", "map_ci_high"]].to_numpy().T - table["map"].to_numpy()),
           error_kw={"lw": 0.8, "capsize": 2})
    ax.bar(x + 0.2, 100 * table["top1"], width=0.4, label="Top-1", color="#e39b3a")
    ax.scatter(x - 0.2, 100 * table["chance_map"], marker="_", s=400, color="black", label="chance mAP", zorder=3)
    for xi, m, t in zip(x, table["map"], table["top1"]):
        ax.text(xi - 0.2, 100 * m + 1, f"{100 * m:.1f}", ha="center", fontsize=8)
        ax.text(xi + 0.2, 100 * t + 1, f"{100 * t:.1f}", ha="center", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Writer retrieval on the test split (leave-one-out)")
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def loss_curves(logs: dict[str, str], path) -> None:
    """Training loss per epoch of every training run ({label: log.parquet}), one panel per run
    (AttMask, pretext cross-entropy, masked-HOG MSE and multi-similarity losses have unrelated scales)."""
    n = max(len(logs), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), dpi=100, squeeze=False)
    for ax, (label, log_path) in zip(axes.ravel(), logs.items()):
        table = pd.read_parquet(log_path)
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
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes.ravel()[len(logs):]:
        ax.axis("off")
    fig.suptitle("Training runs (loss per epoch)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


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
            colour = "#2a9d3a" if r.relevant else "#c8322b"
            cells.append(f'<td><img src="data:image/jpeg;base64,{_thumbnail(index.loc[r.doc_id, "path"], height, colour)}">'
                         f"<br>#{r.rank} {html.escape(r.doc_id)}<br>writer {html.escape(str(index.loc[r.doc_id, 'writer']))}"
                         f", score {r.score:.3f}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table class='ranks'>" + "".join(rows) + "</table>"


CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}
td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:right;font-size:13px}
.ranks td{text-align:center;vertical-align:top;border:none;font-size:11px}h2{margin-top:1.5em}"""


def write_report(benchmark_path, chart_path, experiments: list[dict], report_settings: dict, out_path,
                 extra_tables: dict[str, str] | None = None, loss_chart=None,
                 figures: dict[str, tuple[str, str]] | None = None) -> None:
    """experiments: dicts with dataset, folder, rankings (path), index (path);
    figures: title -> (PNG path, caption) shown after the tables."""
    table = pd.read_parquet(benchmark_path)
    # Provenance columns (per-stage seconds, device, hashes) stay in benchmark.parquet.
    hidden = ["settings_hash", "code_version", "kind", *[c for c in table.columns if c.startswith("seconds_")]]
    shown = table.drop(columns=hidden, errors="ignore").copy()
    for col in ("map", "top1"):
        shown[col] = [f"{100 * v:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"
                      for v, lo, hi in zip(shown[col], shown[f"{col}_ci_low"], shown[f"{col}_ci_high"])]
    shown["delta_map"] = [f"{100 * v:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]" if b else ""
                          for v, lo, hi, b in zip(shown.delta_map, shown.delta_map_ci_low, shown.delta_map_ci_high,
                                                  shown.baseline)]
    shown = shown.drop(columns=["map_ci_low", "map_ci_high", "top1_ci_low", "top1_ci_high", "delta_map_ci_low",
                                "delta_map_ci_high"])
    for col in ("p_at_5", "p_at_10", "chance_map", "share_improved", "share_worsened"):
        shown[col] = (100 * shown[col]).map(lambda v: f"{v:.2f}")
    chart = base64.b64encode(Path(chart_path).read_bytes()).decode()
    parts = [f"<html><head><meta charset='utf-8'><title>writer-retrieval report</title><style>{CSS}</style></head><body>",
             "<h1>writer-retrieval benchmark</h1>",
             "<p>Leave-one-out retrieval over each dataset's test split: every test document queries all other "
             "test documents; queries whose writer has no other document are not scored but stay as distractors. "
             "mAP, Top-1, P@k and the expected mAP of a random ranking (chance) are in %, mAP and Top-1 with "
             "their 95 % confidence interval (bootstrap over writers). delta_map: mean difference of AP to the "
             "baseline row of the same test set, query by query, with its paired bootstrap interval; "
             "share_improved / share_worsened: the queries whose AP rose / fell.</p>",
             shown.to_html(index=False, escape=True, border=0),
             f"<p><img src='data:image/png;base64,{chart}'></p>"]
    if loss_chart:
        curve = base64.b64encode(Path(loss_chart).read_bytes()).decode()
        parts += ["<h2>Pretraining</h2>", f"<p><img src='data:image/png;base64,{curve}'></p>"]
    for title, fragment in (extra_tables or {}).items():
        parts += [f"<h2>{html.escape(title)}</h2>", fragment]
    for title, (png, caption) in (figures or {}).items():
        data = base64.b64encode(Path(png).read_bytes()).decode()
        parts += [f"<h2>{html.escape(title)}</h2>", f"<p>{html.escape(caption)}</p>",
                  f"<p><img src='data:image/png;base64,{data}'></p>"]
    by_dataset: dict[str, dict] = {}
    for exp in experiments:
        by_dataset.setdefault(exp["dataset"], exp)  # the first experiment of each dataset
    for dataset, exp in by_dataset.items():
        fragment = example_rankings(exp["rankings"], exp["index"], report_settings["queries_shown"],
                                    report_settings["thumbnail_height"])
        if fragment:
            parts += [f"<h2>{html.escape(dataset)}: example queries ({html.escape(exp['folder'])})</h2>",
                      "<p>Query, then the top 5; green frame = same writer, red = other writer.</p>", fragment]
    parts.append("</body></html>")
    with atomic_path(out_path, ".html") as tmp:
        tmp.write_text("\n".join(parts))
    log.info("report written to %s", out_path)
