# Stage 5: one vector per page (VLAD of local descriptors, or sum-pooled window [CLS] tokens),
# PCA-whitened -> descriptors.parquet.


def pooled_inputs(wc, what):
    settings = DESCRIPTORS[wc.dataset][wc.dvariant]
    if settings["aggregation"] == "vlad":
        suffix = {"vectors": "npy", "doc_ids": "parquet"}[what]
        return [f"{RESULTS}/{wc.dataset}/vlad/{settings['vlad']}/shards/{s}.{suffix}" for s in shard_ids(wc.dataset)]
    suffix = {"vectors": "cls.npy", "doc_ids": "parquet"}[what]
    return [f"{RESULTS}/{wc.dataset}/features/{settings['features']}/shards/{s}.{suffix}" for s in shard_ids(wc.dataset)]


rule descriptors:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        vectors=lambda wc: pooled_inputs(wc, "vectors"),
        doc_ids=lambda wc: pooled_inputs(wc, "doc_ids"),
    output:
        descriptors=f"{RESULTS}/{{dataset}}/descriptors/{{dvariant}}/descriptors.parquet",
        info=f"{RESULTS}/{{dataset}}/descriptors/{{dvariant}}/pca.json",
    params:
        settings=lambda wc: DESCRIPTORS[wc.dataset][wc.dvariant],
    log:
        f"{RESULTS}/{{dataset}}/logs/descriptors/{{dvariant}}.log",
    script:
        "../scripts/pca.py"
