# Stage 6: leave-one-out retrieval on the test split, metrics and top-k rankings per experiment.


rule retrieval:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        descriptors=lambda wc: f"{RESULTS}/{wc.dataset}/descriptors/{EXPERIMENTS[(wc.dataset, wc.experiment)]['descriptors']}/descriptors.parquet",
        pca=lambda wc: f"{RESULTS}/{wc.dataset}/descriptors/{EXPERIMENTS[(wc.dataset, wc.experiment)]['descriptors']}/pca.json",
        reranked=lambda wc: [f"{RESULTS}/{wc.dataset}/rerank/{r}/reranked.npz"]
        if (r := EXPERIMENTS[(wc.dataset, wc.experiment)]["reranked"])
        else [],
    output:
        rankings=f"{RESULTS}/{{dataset}}/experiments/{{experiment}}/rankings.parquet",
        metrics=f"{RESULTS}/{{dataset}}/experiments/{{experiment}}/metrics.parquet",
    params:
        code=CODE["retrieval"],
        experiment=lambda wc: {k: v for k, v in EXPERIMENTS[(wc.dataset, wc.experiment)].items() if k != "folder"},
        code_version=lambda wc: experiment_code_version(EXPERIMENTS[(wc.dataset, wc.experiment)]),
    threads: 2
    log:
        f"{RESULTS}/{{dataset}}/logs/experiments/{{experiment}}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/retrieval.py"
