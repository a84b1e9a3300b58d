# Stage 6a: reranking of the test split's descriptors (kRNN, SGR, GNN) on sparse top-k graphs.
# A reranker's own folder: changing its parameters reruns only reranking and scoring. With graph
# other_pages (fragments, exclude_same page) same-page documents are not each other's neighbours.


rule rerank:
    input:
        descriptors=get_descriptors("rerank", "descriptors.parquet"),
        index=get_rerank_pages,
    output:
        reranked=f"{RESULTS}/{{dataset}}/rerank/{{folder}}/reranked.npz",
        settings=f"{RESULTS}/{{dataset}}/rerank/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/rerank/{{folder}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/rerank/{{folder}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("rerank"),
    conda:
        "../envs/cpu.yaml"
    threads: 2
    params:
        code=CODE["rerank"],
        settings=result_settings("rerank"),
    script:
        "../scripts/rerank.py"
