# Stage 3: local descriptors per page (SIFT on the binarized page), one job per shard of the index.


rule features_shard:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        masks=get_main_masks,
    output:
        descriptors=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.desc.npy",
        keypoints=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.kp.npy",
        index=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.parquet",
        stats=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.stats.parquet",
        run=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.run.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/features/{{folder}}/{{shard}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/features/{{folder}}/{{shard}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("features"),
    conda:
        "../envs/cpu.yaml"
    params:
        code=CODE["features"],
        settings=result_settings("features"),
        shard_size=config["shard_size"],
    script:
        "../scripts/features.py"


# Per-shard statistics and run facts of one extractor's features -> stats.parquet, settings.json.
rule features:
    input:
        stats=shards_of("features", "stats.parquet"),
        runs=shards_of("features", "run.json"),
    output:
        stats=f"{RESULTS}/{{dataset}}/features/{{folder}}/stats.parquet",
        settings=f"{RESULTS}/{{dataset}}/features/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/features/{{folder}}/merge.log",
    wildcard_constraints:
        folder=PLAN.folders("features"),
    conda:
        "../envs/cpu.yaml"
    params:
        code=CODE["features"],
    script:
        "../scripts/features.py"
