# Stage 6: leave-one-out retrieval on the test split: metrics with writer-bootstrap CIs, the per-query
# table and the top-k rankings per experiment.
# The metrics row carries the device and per-stage seconds of its path (from the stages' settings.json).


rule retrieval:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        descriptors=get_descriptors("experiment", "descriptors.parquet"),
        reranked=get_reranked,
        path_settings=get_path_settings,
    output:
        rankings=f"{RESULTS}/{{dataset}}/experiments/{{folder}}/rankings.parquet",
        metrics=f"{RESULTS}/{{dataset}}/experiments/{{folder}}/metrics.parquet",
        queries=f"{RESULTS}/{{dataset}}/experiments/{{folder}}/queries.parquet",
        settings=f"{RESULTS}/{{dataset}}/experiments/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/experiments/{{folder}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/experiments/{{folder}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("experiment"),
    conda:
        "../envs/cpu.yaml"
    threads: 1  # a grid has one job per experiment: they, not threads, fill the cores
    params:
        code=CODE["retrieval"],
        settings=result_settings("experiment"),
        labels=get_experiment_labels,
        code_version=experiment_code_version,
    script:
        "../scripts/retrieval.py"
