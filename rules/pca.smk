# Stage 5: one vector per page (VLAD of local descriptors, sum-pooled window [CLS] tokens, or SAGHOG's
# summed patch encodings), PCA-whitened -> descriptors.parquet.


rule descriptors:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        vectors=get_pooled("vectors"),
        doc_ids=get_pooled("doc_ids"),
    output:
        descriptors=f"{RESULTS}/{{dataset}}/descriptors/{{folder}}/descriptors.parquet",
        info=f"{RESULTS}/{{dataset}}/descriptors/{{folder}}/pca.json",
        settings=f"{RESULTS}/{{dataset}}/descriptors/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/descriptors/{{folder}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/descriptors/{{folder}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("descriptors"),
    conda:
        "../envs/cpu.yaml"
    params:
        code=CODE["pca"],
        settings=result_settings("descriptors"),
        one_row_per_page=get_one_row_per_page,
    script:
        "../scripts/pca.py"
