# Stage 4: VLAD codebook (k-means on a seeded sample of train descriptors) and encoding per shard.


def feature_shards(dataset, fvariant, suffix):
    return [f"{RESULTS}/{dataset}/features/{fvariant}/shards/{s}.{suffix}" for s in shard_ids(dataset)]


rule vlad_codebook:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        descriptors=lambda wc: feature_shards(wc.dataset, CODEBOOK[wc.dataset][wc.cvariant]["features"], "desc.npy"),
        shard_index=lambda wc: feature_shards(wc.dataset, CODEBOOK[wc.dataset][wc.cvariant]["features"], "parquet"),
    output:
        codebook=f"{RESULTS}/{{dataset}}/codebook/{{cvariant}}/codebook.npy",
        info=f"{RESULTS}/{{dataset}}/codebook/{{cvariant}}/codebook.json",
    params:
        settings=lambda wc: CODEBOOK[wc.dataset][wc.cvariant],
    threads: 4
    log:
        f"{RESULTS}/{{dataset}}/logs/codebook/{{cvariant}}.log",
    script:
        "../scripts/vlad.py"


def vlad_input(wc, what):
    settings = VLAD[wc.dataset][wc.vvariant]
    if what == "codebook":
        return f"{RESULTS}/{wc.dataset}/codebook/{settings['codebook']}/codebook.npy"
    return f"{RESULTS}/{wc.dataset}/features/{settings['features']}/shards/{wc.shard}.{what}"


rule vlad_shard:
    input:
        codebook=lambda wc: vlad_input(wc, "codebook"),
        descriptors=lambda wc: vlad_input(wc, "desc.npy"),
        shard_index=lambda wc: vlad_input(wc, "parquet"),
    output:
        vectors=f"{RESULTS}/{{dataset}}/vlad/{{vvariant}}/shards/{{shard}}.npy",
        doc_ids=f"{RESULTS}/{{dataset}}/vlad/{{vvariant}}/shards/{{shard}}.parquet",
    params:
        settings=lambda wc: VLAD[wc.dataset][wc.vvariant],
    log:
        f"{RESULTS}/{{dataset}}/logs/vlad/{{vvariant}}/{{shard}}.log",
    script:
        "../scripts/vlad.py"
