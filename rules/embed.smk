# Stage 4b: ViT token embedding of binarized pages in windows (foreground patch tokens + window [CLS]),
# one job per shard of the index.


rule embed_shard:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        masks=get_main_masks,
        backbone=get_backbone("embed"),
    output:
        tokens=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.tokens.npy",
        cls=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.cls.npy",
        index=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.parquet",
        stats=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.stats.parquet",
        run=f"{RESULTS}/{{dataset}}/features/{{folder}}/shards/{{shard}}.run.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/embed/{{folder}}/{{shard}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/embed/{{folder}}/{{shard}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("embed"),
    conda:
        "../envs/gpu.yaml"
    # One core per shard: on a CPU the shards are the parallelism (two one-thread jobs beat one
    # two-thread job on these small matrices); the SLURM profile sets more beside a GPU.
    threads: 1
    resources:
        gpu=gpu_count("embed"),
    params:
        code=CODE["embed"],
        settings=result_settings("embed"),
        shard_size=config["shard_size"],
    script:
        "../scripts/embed.py"


rule embed:
    input:
        stats=shards_of("embed", "stats.parquet"),
        runs=shards_of("embed", "run.json"),
    output:
        stats=f"{RESULTS}/{{dataset}}/features/{{folder}}/stats.parquet",
        settings=f"{RESULTS}/{{dataset}}/features/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/embed/{{folder}}/merge.log",
    wildcard_constraints:
        folder=PLAN.folders("embed"),
    conda:
        "../envs/gpu.yaml"
    params:
        code=CODE["embed"],
    script:
        "../scripts/embed.py"
