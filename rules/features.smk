# Stage 3: local descriptors per page (SIFT on the binarized page), one job per shard of the index.


rule features_shard:
    wildcard_constraints:
        fvariant=variants_of_kind("sift"),
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        masks=main_masks,
    output:
        descriptors=f"{RESULTS}/{{dataset}}/features/{{fvariant}}/shards/{{shard}}.desc.npy",
        keypoints=f"{RESULTS}/{{dataset}}/features/{{fvariant}}/shards/{{shard}}.kp.npy",
        index=f"{RESULTS}/{{dataset}}/features/{{fvariant}}/shards/{{shard}}.parquet",
        stats=f"{RESULTS}/{{dataset}}/features/{{fvariant}}/shards/{{shard}}.stats.parquet",
    params:
        code=CODE["features"],
        settings=lambda wc: FEATURES[wc.dataset][wc.fvariant],
        shard_size=config["shard_size"],
    log:
        f"{RESULTS}/{{dataset}}/logs/features/{{fvariant}}/{{shard}}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/features.py"


rule features:
    input:
        lambda wc: [f"{RESULTS}/{wc.dataset}/features/{wc.fvariant}/shards/{s}.stats.parquet" for s in shard_ids(wc.dataset)],
    output:
        stats=f"{RESULTS}/{{dataset}}/features/{{fvariant}}/stats.parquet",
    params:
        code=CODE["features"],
    log:
        f"{RESULTS}/{{dataset}}/logs/features/{{fvariant}}/merge.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/features.py"
