"""Glue for rule `report`: see writer_retrieval.report."""
from writer_retrieval.logs import stage_logging
from writer_retrieval.report import (ap_distribution, cluster_section, collect_benchmark, comparison_chart,
                                     comparison_section, distribution_section, examples_section, glance_section,
                                     loss_curves, map_chart, provenance_section, quality_section, stage_time_chart,
                                     stage_times, training_section, write_pivot, write_report)

if __name__ == "__main__":
    sm = snakemake
    with stage_logging(sm.log[0], sm.rule):
        settings, out = dict(sm.params.settings), sm.output
        table, queries = collect_benchmark(list(sm.input.metrics), list(sm.input.queries), out.benchmark,
                                           dict(settings["baseline"]), dict(sm.params.bootstrap))
        runs = {"/".join(p.split("/")[-4:-1:2]): p for p in sm.input.training}  # "<dataset>/<run>"
        times = stage_times(table)
        write_pivot(table, out.pivot)
        map_chart(table, out.chart)
        ap_distribution(table, queries, out.distribution)
        comparison_chart(table, out.comparison)
        stage_time_chart(times, out.stage_times)
        loss_curves(runs, out.losses)
        experiments = [{**g, "rankings": r, "index": i}
                       for g, r, i in zip(sm.params.grid, sm.input.rankings, sm.input.indexes)]
        sections = [glance_section(table, out.chart), distribution_section(out.distribution),
                    comparison_section(table, out.comparison), training_section(runs, out.losses),
                    quality_section(list(sm.input.quality)),
                    cluster_section(list(sm.input.clusters), list(sm.input.cluster_summaries)),
                    examples_section(experiments, settings),
                    provenance_section(table, times, out.stage_times, sm.params.run_settings, sm.params.code)]
        write_report([s for s in sections if s], out.html)
