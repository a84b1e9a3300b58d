# Stage 7: results/benchmark.parquet (all metrics rows) and results/report.html.


rule report:
    input:
        metrics=experiment_files("metrics.parquet"),
        rankings=experiment_files("rankings.parquet"),
        indexes=[f"{RESULTS}/{e['dataset']}/index.parquet" for e in GRID],
        quality=[f"{RESULTS}/{d}/binarize/quality_summary.parquet" for d in DATASETS if has_ground_truth(d)],
        training=[f"{RESULTS}/{d}/pretrain/{p}/log.parquet" for d in DATASETS for p in PRETRAIN[d]]
        + [f"{RESULTS}/{d}/finetune/{f}/log.parquet" for d in DATASETS for f in FINETUNE[d]],
        clusters=[f"{RESULTS}/{d}/cluster/{c}/contact_sheet.png" for d in DATASETS for c in used_clusters(d)],
        cluster_summaries=[f"{RESULTS}/{d}/cluster/{c}/summary.json" for d in DATASETS for c in used_clusters(d)],
    output:
        benchmark=report(f"{RESULTS}/benchmark.parquet", category="Benchmark"),
        chart=report(f"{RESULTS}/report/benchmark.png", category="Benchmark", caption="../report/benchmark.rst"),
        losses=report(f"{RESULTS}/report/pretraining.png", category="Pretraining"),
        html=f"{RESULTS}/report.html",
    params:
        code=CODE["report"],
        grid=[{"dataset": e["dataset"], "folder": e["folder"]} for e in GRID],
        settings=config["report"],
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/report.py"
