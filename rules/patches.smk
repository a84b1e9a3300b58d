# Stage 3b: 32x32 patches at SIFT keypoints of the binarized page (SAGHOG), one job per shard of the index.


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
        code=CODE["patches"],
        settings=lambda wc: PATCHES[wc.dataset][wc.patchvariant],
        shard_size=config["shard_size"],
    log:
        f"{RESULTS}/{{dataset}}/logs/patches/{{patchvariant}}/{{shard}}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/patches.py"


rule patches:
    input:
        lambda wc: patch_shards(wc.dataset, wc.patchvariant, "stats.parquet"),
    output:
        stats=f"{RESULTS}/{{dataset}}/patches/{{patchvariant}}/stats.parquet",
    params:
        code=CODE["patches"],
    log:
        f"{RESULTS}/{{dataset}}/logs/patches/{{patchvariant}}/merge.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/patches.py"
