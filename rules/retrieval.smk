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
        experiment=lambda wc: {k: v for k, v in EXPERIMENTS[(wc.dataset, wc.experiment)].items() if k != "folder"},
    threads: 2
    log:
        f"{RESULTS}/{{dataset}}/logs/experiments/{{experiment}}.log",
    script:
        "../scripts/retrieval.py"
