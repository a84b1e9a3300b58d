# Stage 3b: 32x32 patches at SIFT keypoints of the binarized page (SAGHOG), one job per shard of the index.


rule patches_shard:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        masks=get_main_masks,
    output:
        patches=f"{RESULTS}/{{dataset}}/patches/{{folder}}/shards/{{shard}}.patches.npy",
        descriptors=f"{RESULTS}/{{dataset}}/patches/{{folder}}/shards/{{shard}}.desc.npy",
        index=f"{RESULTS}/{{dataset}}/patches/{{folder}}/shards/{{shard}}.parquet",
        stats=f"{RESULTS}/{{dataset}}/patches/{{folder}}/shards/{{shard}}.stats.parquet",
        run=f"{RESULTS}/{{dataset}}/patches/{{folder}}/shards/{{shard}}.run.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/patches/{{folder}}/{{shard}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/patches/{{folder}}/{{shard}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("patches"),
    priority: 1  # SAGHOG's chain (patches, then every patch of a test page embedded) is the longest
    conda:
        "../envs/cpu.yaml"
    params:
        code=CODE["patches"],
        settings=result_settings("patches"),
        shard_size=config["shard_size"],
    script:
        "../scripts/patches.py"


rule patches:
    input:
        stats=shards_of("patches", "stats.parquet"),
        runs=shards_of("patches", "run.json"),
    output:
        stats=f"{RESULTS}/{{dataset}}/patches/{{folder}}/stats.parquet",
        settings=f"{RESULTS}/{{dataset}}/patches/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/patches/{{folder}}/merge.log",
    wildcard_constraints:
        folder=PLAN.folders("patches"),
    conda:
        "../envs/cpu.yaml"
    params:
        code=CODE["patches"],
    script:
        "../scripts/patches.py"
