"""Glue for rule `report`: see writer_retrieval.report."""
import json

import pandas as pd

from writer_retrieval.logs import stage_logging
from writer_retrieval.report import bar_chart, collect_benchmark, loss_curves, rerank_graph_table, write_report
from writer_retrieval.training_health import health_table

if __name__ == "__main__":
    sm = snakemake
    with stage_logging(sm.log[0], sm.rule):
        table = collect_benchmark(list(sm.input.metrics), list(sm.input.queries), sm.output.benchmark,
                                  dict(sm.params.settings["baseline"]), dict(sm.params.bootstrap))
        bar_chart(table, sm.output.chart)
        experiments = [{**g, "rankings": r, "index": i}
                       for g, r, i in zip(sm.params.grid, sm.input.rankings, sm.input.indexes)]
        extra = {}
        graphs = rerank_graph_table(table)
        if not graphs.empty:
            extra["Fragments: rerank graph with all test documents, and without same-page documents (mAP %)"] = \
                graphs.to_html(index=False, border=0, float_format=lambda v: f"{v:.2f}")
        for path in sm.input.quality:
            dataset = path.split("/")[-3]
            extra[f"{dataset}: binarization quality against ground truth"] = pd.read_parquet(path).to_html(
                index=False, border=0, float_format=lambda v: f"{v:.4f}")
        runs = {"/".join(p.split("/")[-4:-1:2]): p for p in sm.input.training}  # "<dataset>/<run>"
        loss_curves(runs, sm.output.losses)
        if runs:
            extra["Training health (last epoch; flags name runs that look collapsed or at chance)"] = health_table(
                runs).to_html(index=False, border=0, float_format=lambda v: f"{v:.4f}")
        figures = {}
        for png, summary_path in zip(sm.input.clusters, sm.input.cluster_summaries):
            summary = json.loads(open(summary_path).read())
            dataset, variant = png.split("/")[-4], png.split("/")[-2]
            figures[f"{dataset}: patch clusters ({variant})"] = (
                png, f"Pseudo labels for SAGHOG fine-tuning: each row shows patches of one k-means cluster "
                     f"(cluster id at the left); patches of one cluster should look alike. "
                     f"{summary['n_patches']} patches, {100 * summary['ambiguous_share']:.1f}% dropped as ambiguous, "
                     f"median cluster size {summary['median_cluster_size']}.")
        write_report(sm.output.benchmark, sm.output.chart, experiments, dict(sm.params.settings), sm.output.html,
                     extra, loss_chart=sm.output.losses if runs else None, figures=figures)
