# Stage 5: one vector per page (VLAD of local descriptors, sum-pooled window [CLS] tokens, or SAGHOG's
# summed patch encodings), PCA-whitened -> descriptors.parquet.


def pooled_inputs(wc, what):
    """Per-shard page vectors (one row per page: VLAD, SAGHOG), or window [CLS] tokens to sum."""
    settings = DESCRIPTORS[wc.dataset][wc.dvariant]
    if settings["aggregation"] == "sum" and feature_kind(wc.dataset, settings["features"]) == "saghog":
        suffix = {"vectors": "pooled.npy", "doc_ids": "pooled.parquet"}[what]
        return [f"{RESULTS}/{wc.dataset}/features/{settings['features']}/shards/{s}.{suffix}" for s in shard_ids(wc.dataset)]
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
        one_row_per_page=lambda wc: DESCRIPTORS[wc.dataset][wc.dvariant]["aggregation"] == "vlad"
        or feature_kind(wc.dataset, DESCRIPTORS[wc.dataset][wc.dvariant]["features"]) == "saghog",
    log:
        f"{RESULTS}/{{dataset}}/logs/descriptors/{{dvariant}}.log",
    script:
        "../scripts/pca.py"
