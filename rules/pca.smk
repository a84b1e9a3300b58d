# Stage 5: one vector per page (VLAD of local descriptors, sum-pooled window [CLS] tokens, or SAGHOG's
# summed patch encodings), PCA-whitened (or not: aggregation.pca) -> descriptors.parquet; the fitted
# PCA (whitening.npz) is what a transfer experiment (train_on) applies to another dataset.


rule descriptors:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        vectors=get_pooled("vectors"),
        doc_ids=get_pooled("doc_ids"),
        fitted=get_fitted_whitening,
    output:
        descriptors=f"{RESULTS}/{{dataset}}/descriptors/{{folder}}/descriptors.parquet",
        info=f"{RESULTS}/{{dataset}}/descriptors/{{folder}}/pca.json",
        whitening=f"{RESULTS}/{{dataset}}/descriptors/{{folder}}/whitening.npz",
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
