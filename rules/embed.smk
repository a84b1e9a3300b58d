# Stage 4b: ViT token embedding of binarized pages in windows (foreground patch tokens + window [CLS]),
# one job per shard of the index.


rule embed_shard:
    wildcard_constraints:
        fvariant=variants_of_kind("vit"),
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        masks=main_masks,
        backbone=embed_backbone,
    output:
        tokens=f"{RESULTS}/{{dataset}}/features/{{fvariant}}/shards/{{shard}}.tokens.npy",
        cls=f"{RESULTS}/{{dataset}}/features/{{fvariant}}/shards/{{shard}}.cls.npy",
        index=f"{RESULTS}/{{dataset}}/features/{{fvariant}}/shards/{{shard}}.parquet",
        stats=f"{RESULTS}/{{dataset}}/features/{{fvariant}}/shards/{{shard}}.stats.parquet",
    params:
        code=CODE["embed"],
        settings=lambda wc: {**FEATURES[wc.dataset][wc.fvariant]["embed"],
                             "model": FEATURES[wc.dataset][wc.fvariant]["model"],
                             "seed": FEATURES[wc.dataset][wc.fvariant]["seed"]},
        device=lambda wc: FEATURES[wc.dataset][wc.fvariant]["device"],
        shard_size=config["shard_size"],
    threads: 2
    resources:
        gpu=lambda wc: 0 if FEATURES[wc.dataset][wc.fvariant]["device"] == "cpu" else 1,
    log:
        f"{RESULTS}/{{dataset}}/logs/embed/{{fvariant}}/{{shard}}.log",
    conda:
        "../envs/gpu.yaml"
    script:
        "../scripts/embed.py"


# SAGHOG page descriptors: sum of the page's patch encodings, power-normalised, L2 (one row per page).
rule embed_patches_shard:
    wildcard_constraints:
        fvariant=variants_of_kind("saghog"),
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        patches=lambda wc: f"{RESULTS}/{wc.dataset}/patches/{saghog_models(wc)['patches']}/shards/{wc.shard}.patches.npy",
        shard_index=lambda wc: f"{RESULTS}/{wc.dataset}/patches/{saghog_models(wc)['patches']}/shards/{wc.shard}.parquet",
        backbone=lambda wc: saghog_models(wc)["backbone"],
        finetuned=lambda wc: saghog_models(wc)["finetuned"],
    output:
        vectors=f"{RESULTS}/{{dataset}}/features/{{fvariant}}/shards/{{shard}}.pooled.npy",
        doc_ids=f"{RESULTS}/{{dataset}}/features/{{fvariant}}/shards/{{shard}}.pooled.parquet",
        stats=f"{RESULTS}/{{dataset}}/features/{{fvariant}}/shards/{{shard}}.stats.parquet",
    params:
        code=CODE["embed"],
        model=lambda wc: FEATURES[wc.dataset][wc.fvariant]["model"],
        embed=lambda wc: FEATURES[wc.dataset][wc.fvariant]["embed"],
        finetune=lambda wc: FEATURES[wc.dataset][wc.fvariant]["finetune"],
        device=lambda wc: FEATURES[wc.dataset][wc.fvariant]["device"],
        shard_size=config["shard_size"],
    threads: 2
    resources:
        gpu=lambda wc: 0 if FEATURES[wc.dataset][wc.fvariant]["device"] == "cpu" else 1,
    log:
        f"{RESULTS}/{{dataset}}/logs/embed/{{fvariant}}/{{shard}}.log",
    conda:
        "../envs/gpu.yaml"
    script:
        "../scripts/embed.py"
