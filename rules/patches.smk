# Stage 3b: 32x32 patches at SIFT keypoints of the binarized page (SAGHOG), one job per shard of the index.


def saghog_feature(dataset, stage, variant):
    """The settings of a SAGHOG extractor whose `stage` folder (patches, cluster, finetune) is `variant`."""
    of = {"patches": patches_variant, "cluster": cluster_variant, "finetune": finetune_variant}[stage]
    for name in SAGHOG_FEATURES:
        v = of(config, dataset, name)
        if v and v[0] == variant:
            return config["features"][name]
    raise ValueError(f"no SAGHOG feature extractor uses {stage} folder {variant}")


def patch_shards(dataset, patchvariant, suffix):
    return [f"{RESULTS}/{dataset}/patches/{patchvariant}/shards/{s}.{suffix}" for s in shard_ids(dataset)]


rule patches_shard:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        masks=main_masks,
    output:
        patches=f"{RESULTS}/{{dataset}}/patches/{{patchvariant}}/shards/{{shard}}.patches.npy",
        descriptors=f"{RESULTS}/{{dataset}}/patches/{{patchvariant}}/shards/{{shard}}.desc.npy",
        index=f"{RESULTS}/{{dataset}}/patches/{{patchvariant}}/shards/{{shard}}.parquet",
        stats=f"{RESULTS}/{{dataset}}/patches/{{patchvariant}}/shards/{{shard}}.stats.parquet",
    params:
        settings=lambda wc: PATCHES[wc.dataset][wc.patchvariant],
        shard_size=config["shard_size"],
    log:
        f"{RESULTS}/{{dataset}}/logs/patches/{{patchvariant}}/{{shard}}.log",
    script:
        "../scripts/patches.py"


rule patches:
    input:
        lambda wc: patch_shards(wc.dataset, wc.patchvariant, "stats.parquet"),
    output:
        stats=f"{RESULTS}/{{dataset}}/patches/{{patchvariant}}/stats.parquet",
    log:
        f"{RESULTS}/{{dataset}}/logs/patches/{{patchvariant}}/merge.log",
    script:
        "../scripts/patches.py"
