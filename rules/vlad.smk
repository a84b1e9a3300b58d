# Stage 4: VLAD codebook (k-means on a seeded sample of train descriptors) and encoding per shard.


def feature_shards(wc, suffix):
    fvariant = VLAD[wc.dataset][wc.vvariant]["features"]
    return [f"{RESULTS}/{wc.dataset}/features/{fvariant}/shards/{s}.{suffix}" for s in shard_ids(wc.dataset)]


rule vlad_codebook:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        descriptors=lambda wc: feature_shards(wc, "desc.npy"),
        shard_index=lambda wc: feature_shards(wc, "parquet"),
    output:
        codebook=f"{RESULTS}/{{dataset}}/vlad/{{vvariant}}/codebook.npy",
        info=f"{RESULTS}/{{dataset}}/vlad/{{vvariant}}/codebook.json",
    params:
        settings=lambda wc: VLAD[wc.dataset][wc.vvariant],
    threads: 4
    log:
        f"{RESULTS}/{{dataset}}/logs/vlad/{{vvariant}}/codebook.log",
    script:
        "../scripts/vlad.py"


rule vlad_shard:
    input:
        codebook=f"{RESULTS}/{{dataset}}/vlad/{{vvariant}}/codebook.npy",
        descriptors=lambda wc: f"{RESULTS}/{wc.dataset}/features/{VLAD[wc.dataset][wc.vvariant]['features']}/shards/{wc.shard}.desc.npy",
        shard_index=lambda wc: f"{RESULTS}/{wc.dataset}/features/{VLAD[wc.dataset][wc.vvariant]['features']}/shards/{wc.shard}.parquet",
    output:
        vectors=f"{RESULTS}/{{dataset}}/vlad/{{vvariant}}/shards/{{shard}}.npy",
        doc_ids=f"{RESULTS}/{{dataset}}/vlad/{{vvariant}}/shards/{{shard}}.parquet",
    params:
        settings=lambda wc: VLAD[wc.dataset][wc.vvariant],
    log:
        f"{RESULTS}/{{dataset}}/logs/vlad/{{vvariant}}/{{shard}}.log",
    script:
        "../scripts/vlad.py"
