# Stage 7: results/benchmark.parquet (all metrics rows), results/report.html and its figures.
import yaml


rule report:
    input:
        metrics=experiment_files("metrics.parquet"),
        rankings=experiment_files("rankings.parquet"),
        queries=experiment_files("queries.parquet"),
        indexes=[f"{RESULTS}/{e.dataset}/index.parquet" for e in PLAN.experiments],
        quality=[
            f"{RESULTS}/{d}/binarize/quality_summary.parquet"
            for d in DATASETS
            if has_ground_truth(d)
        ],
        training=training_logs(),
        clusters=cluster_files("contact_sheet.png"),
        cluster_summaries=cluster_files("summary.json"),
    output:
        benchmark=report(
            f"{RESULTS}/benchmark.parquet",
            category="Benchmark",
            caption="../report/benchmark_table.rst",
        ),
        pivot=report(
            f"{RESULTS}/report/pivot.html",
            category="Benchmark",
            caption="../report/pivot.rst",
        ),
        chart=report(
            f"{RESULTS}/report/benchmark.png",
            category="Benchmark",
            caption="../report/benchmark.rst",
        ),
        distribution=report(
            f"{RESULTS}/report/ap_distribution.png",
            category="Per-query results",
            caption="../report/ap_distribution.rst",
        ),
        comparison=report(
            f"{RESULTS}/report/comparison.png",
            category="Per-query results",
            caption="../report/comparison.rst",
        ),
        stage_times=report(
            f"{RESULTS}/report/stage_times.png",
            category="Provenance",
            caption="../report/stage_times.rst",
        ),
        losses=report(
            f"{RESULTS}/report/pretraining.png",
            category="Pretraining",
            caption="../report/pretraining.rst",
        ),
        html=f"{RESULTS}/report.html",
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "../envs/cpu.yaml"
    params:
        code=CODE["report"],
        grid=[{"dataset": e.dataset, "folder": e.folder} for e in PLAN.experiments],
        settings=config["report"],
        bootstrap=config["retrieval"]["bootstrap"],
        # The config shown in the report, without its execution settings (those never re-run a job),
        # as YAML with sorted keys: the order of keys in a config file is no reason to re-run either.
        run_settings=yaml.safe_dump(plain(PLAN.split()[0])),
    script:
        "../scripts/report.py"
