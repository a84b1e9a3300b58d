# Stage 6a: reranking of the test split's descriptors (kRNN, SGR, GNN) on sparse top-k graphs.
# A reranker's own folder: changing its parameters reruns only reranking and scoring.


rule rerank:
    input:
        descriptors=lambda wc: f"{RESULTS}/{wc.dataset}/descriptors/{RERANKED[(wc.dataset, wc.rvariant)]['descriptors']}/descriptors.parquet",
    output:
        f"{RESULTS}/{{dataset}}/rerank/{{rvariant}}/reranked.npz",
    params:
        code=CODE["rerank"],
        settings=lambda wc: config["rerank"][RERANKED[(wc.dataset, wc.rvariant)]["rerank"]],
    threads: 2
    log:
        f"{RESULTS}/{{dataset}}/logs/rerank/{{rvariant}}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/rerank.py"
