# Stage 4b: ViT token embedding of binarized pages in windows (foreground patch tokens + window [CLS]),
# one job per shard of the index.


def embed_backbone(wc):
    """The pretrained backbone, or nothing for an untrained (random) ViT."""
    for feature in config["features"]:
        if features_variant(config, wc.dataset, feature)[0] == wc.fvariant:
            variant = pretrain_variant(config, wc.dataset, feature)
            return [f"{RESULTS}/{wc.dataset}/pretrain/{variant[0]}/backbone.pt"] if variant else []
    return []


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
    script:
        "../scripts/embed.py"


def saghog_models(wc):
    """The SAGHOG patch encoder (pretrain stage) and, when fine-tuned, the NetRVLAD model."""
    for feature in SAGHOG_FEATURES:
        if features_variant(config, wc.dataset, feature)[0] == wc.fvariant:
            tuned = finetune_variant(config, wc.dataset, feature)
            return {"backbone": f"{RESULTS}/{wc.dataset}/pretrain/{pretrain_variant(config, wc.dataset, feature)[0]}/backbone.pt",
                    "finetuned": [f"{RESULTS}/{wc.dataset}/finetune/{tuned[0]}/model.pt"] if tuned else [],
                    "patches": patches_variant(config, wc.dataset, feature)[0]}
    raise ValueError(f"{wc.fvariant} is not a SAGHOG feature extractor")


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
    script:
        "../scripts/embed.py"
