# Stage 4: VLAD codebook (k-means on a seeded sample of train descriptors) and encoding per shard.


rule vlad_codebook:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        descriptors=lambda wc: feature_shards(wc.dataset, CODEBOOK[wc.dataset][wc.cvariant]["features"], "local"),
        shard_index=lambda wc: feature_shards(wc.dataset, CODEBOOK[wc.dataset][wc.cvariant]["features"], "parquet"),
    output:
        codebook=f"{RESULTS}/{{dataset}}/codebook/{{cvariant}}/codebook.npy",
        info=f"{RESULTS}/{{dataset}}/codebook/{{cvariant}}/codebook.json",
    params:
        code=CODE["vlad"],
        settings=lambda wc: CODEBOOK[wc.dataset][wc.cvariant],
        kind=lambda wc: feature_kind(wc.dataset, CODEBOOK[wc.dataset][wc.cvariant]["features"]),
    threads: 4
    log:
        f"{RESULTS}/{{dataset}}/logs/codebook/{{cvariant}}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/vlad.py"


rule vlad_shard:
    input:
        codebook=lambda wc: vlad_input(wc, "codebook"),
        descriptors=lambda wc: vlad_input(wc, "local"),
        shard_index=lambda wc: vlad_input(wc, "parquet"),
    output:
        vectors=f"{RESULTS}/{{dataset}}/vlad/{{vvariant}}/shards/{{shard}}.npy",
        doc_ids=f"{RESULTS}/{{dataset}}/vlad/{{vvariant}}/shards/{{shard}}.parquet",
    params:
        code=CODE["vlad"],
        settings=lambda wc: VLAD[wc.dataset][wc.vvariant],
        kind=lambda wc: feature_kind(wc.dataset, VLAD[wc.dataset][wc.vvariant]["features"]),
    log:
        f"{RESULTS}/{{dataset}}/logs/vlad/{{vvariant}}/{{shard}}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/vlad.py"
