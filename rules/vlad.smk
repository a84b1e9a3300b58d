# Stage 4: VLAD codebook (k-means on a seeded sample of train descriptors) and encoding per shard.


# Local descriptors of each feature kind: SIFT descriptors or ViT foreground patch tokens.
LOCAL_SUFFIX = {"sift": "desc.npy", "vit": "tokens.npy"}


def feature_shards(dataset, fvariant, suffix):
    if suffix == "local":
        suffix = LOCAL_SUFFIX[feature_kind(dataset, fvariant)]
    return [f"{RESULTS}/{dataset}/features/{fvariant}/shards/{s}.{suffix}" for s in shard_ids(dataset)]


rule vlad_codebook:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        descriptors=lambda wc: feature_shards(wc.dataset, CODEBOOK[wc.dataset][wc.cvariant]["features"], "local"),
        shard_index=lambda wc: feature_shards(wc.dataset, CODEBOOK[wc.dataset][wc.cvariant]["features"], "parquet"),
    output:
        codebook=f"{RESULTS}/{{dataset}}/codebook/{{cvariant}}/codebook.npy",
        info=f"{RESULTS}/{{dataset}}/codebook/{{cvariant}}/codebook.json",
    params:
        settings=lambda wc: CODEBOOK[wc.dataset][wc.cvariant],
        kind=lambda wc: feature_kind(wc.dataset, CODEBOOK[wc.dataset][wc.cvariant]["features"]),
    threads: 4
    log:
        f"{RESULTS}/{{dataset}}/logs/codebook/{{cvariant}}.log",
    script:
        "../scripts/vlad.py"


def vlad_input(wc, what):
    settings = VLAD[wc.dataset][wc.vvariant]
    if what == "codebook":
        return f"{RESULTS}/{wc.dataset}/codebook/{settings['codebook']}/codebook.npy"
    if what == "local":
        what = LOCAL_SUFFIX[feature_kind(wc.dataset, settings["features"])]
    return f"{RESULTS}/{wc.dataset}/features/{settings['features']}/shards/{wc.shard}.{what}"


rule vlad_shard:
    input:
        codebook=lambda wc: vlad_input(wc, "codebook"),
        descriptors=lambda wc: vlad_input(wc, "local"),
        shard_index=lambda wc: vlad_input(wc, "parquet"),
    output:
        vectors=f"{RESULTS}/{{dataset}}/vlad/{{vvariant}}/shards/{{shard}}.npy",
        doc_ids=f"{RESULTS}/{{dataset}}/vlad/{{vvariant}}/shards/{{shard}}.parquet",
    params:
        settings=lambda wc: VLAD[wc.dataset][wc.vvariant],
        kind=lambda wc: feature_kind(wc.dataset, VLAD[wc.dataset][wc.vvariant]["features"]),
    log:
        f"{RESULTS}/{{dataset}}/logs/vlad/{{vvariant}}/{{shard}}.log",
    script:
        "../scripts/vlad.py"
