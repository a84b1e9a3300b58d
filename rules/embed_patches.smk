# Stage 4d: SAGHOG page descriptors: every patch of the page through the (fine-tuned) encoder, the sum
# power-normalised and L2-normalised (one row per page); one job per shard of the index.


rule embed_patches_shard:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        patches=get_patch_shard("embed_patches", "patches.npy"),
        shard_index=get_patch_shard("embed_patches", "parquet"),
        backbone=get_backbone("embed_patches"),
        finetuned=get_finetuned,
    output:
        vectors=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.pooled.npy",
        doc_ids=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.pooled.parquet",
        stats=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.stats.parquet",
        run=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.run.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/embed_patches/{{folder}}/{{shard}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/embed_patches/{{folder}}/{{shard}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("embed_patches"),
    priority: 1
    conda:
        "../envs/gpu.yaml"
    # One core per shard: on a CPU the shards are the parallelism (two one-thread jobs beat one
    # two-thread job on these small matrices); the SLURM profile sets more beside a GPU.
    threads: 1
    resources:
        gpu=gpu_count("embed_patches"),
    params:
        code=CODE["embed_patches"],
        settings=result_settings("embed_patches"),
        shard_size=config["shard_size"],
    script:
        "../scripts/embed_patches.py"


rule embed_patches:
    input:
        stats=shards_of("embed_patches", "stats.parquet"),
        runs=shards_of("embed_patches", "run.json"),
    output:
        stats=f"{RESULTS}/{{dataset}}/features/{{folder}}/stats.parquet",
        settings=f"{RESULTS}/{{dataset}}/features/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/embed_patches/{{folder}}/merge.log",
    wildcard_constraints:
        folder=PLAN.folders("embed_patches"),
    conda:
        "../envs/gpu.yaml"
    params:
        code=CODE["embed_patches"],
    script:
        "../scripts/embed_patches.py"
