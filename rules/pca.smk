# Stage 5: PCA whitening of the VLAD vectors -> descriptors.parquet (one vector per page).


def vlad_shards(wc, suffix):
    vvariant = DESCRIPTORS[wc.dataset][wc.dvariant]["vlad"]
    return [f"{RESULTS}/{wc.dataset}/vlad/{vvariant}/shards/{s}.{suffix}" for s in shard_ids(wc.dataset)]


rule descriptors:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        vectors=lambda wc: vlad_shards(wc, "npy"),
        doc_ids=lambda wc: vlad_shards(wc, "parquet"),
    output:
        descriptors=f"{RESULTS}/{{dataset}}/descriptors/{{dvariant}}/descriptors.parquet",
        info=f"{RESULTS}/{{dataset}}/descriptors/{{dvariant}}/pca.json",
    params:
        settings=lambda wc: DESCRIPTORS[wc.dataset][wc.dvariant],
    log:
        f"{RESULTS}/{{dataset}}/logs/descriptors/{{dvariant}}.log",
    script:
        "../scripts/pca.py"
