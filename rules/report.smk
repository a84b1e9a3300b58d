# Stage 7: results/benchmark.parquet (all metrics rows) and results/report.html.


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
        benchmark=report(f"{RESULTS}/benchmark.parquet", category="Benchmark"),
        chart=report(
            f"{RESULTS}/report/benchmark.png",
            category="Benchmark",
            caption="../report/benchmark.rst",
        ),
        losses=report(f"{RESULTS}/report/pretraining.png", category="Pretraining"),
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
    script:
        "../scripts/report.py"
