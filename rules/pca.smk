# Stage 5: one vector per page (VLAD of local descriptors, sum-pooled window [CLS] tokens, or SAGHOG's
# summed patch encodings), PCA-whitened -> descriptors.parquet.


rule descriptors:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        vectors=lambda wc: pooled_inputs(wc, "vectors"),
        doc_ids=lambda wc: pooled_inputs(wc, "doc_ids"),
    output:
        descriptors=f"{RESULTS}/{{dataset}}/descriptors/{{dvariant}}/descriptors.parquet",
        info=f"{RESULTS}/{{dataset}}/descriptors/{{dvariant}}/pca.json",
    params:
        code=CODE["pca"],
        settings=lambda wc: DESCRIPTORS[wc.dataset][wc.dvariant],
        one_row_per_page=lambda wc: DESCRIPTORS[wc.dataset][wc.dvariant]["aggregation"] == "vlad"
        or feature_kind(wc.dataset, DESCRIPTORS[wc.dataset][wc.dvariant]["features"]) == "saghog",
    log:
        f"{RESULTS}/{{dataset}}/logs/descriptors/{{dvariant}}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/pca.py"
