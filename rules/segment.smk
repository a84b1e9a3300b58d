# Stage 2a: Segment-Anything page segmentation (SAGHOG preprocessing): page region, cleaned and
# cropped page, and the writing-amount filter for pretraining; one job per shard of the index.


rule segment_shard:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
    output:
        table=f"{RESULTS}/{{dataset}}/segment/{{folder}}/shards/{{shard}}.parquet",
        run=f"{RESULTS}/{{dataset}}/segment/{{folder}}/shards/{{shard}}.run.json",
        pages=directory(f"{RESULTS}/{{dataset}}/segment/{{folder}}/pages/{{shard}}"),
        regions=directory(f"{RESULTS}/{{dataset}}/segment/{{folder}}/regions/{{shard}}"),
    log:
        f"{RESULTS}/{{dataset}}/logs/segment/{{folder}}/{{shard}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/segment/{{folder}}/{{shard}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("segment"),
    conda:
        "../envs/gpu.yaml"
    threads: 2
    resources:
        gpu=gpu_count("segment"),
    params:
        code=CODE["segment"],
        settings=result_settings("segment"),
        shard_size=config["shard_size"],
    script:
        "../scripts/segment.py"


rule segment:
    input:
        tables=shards_of("segment", "parquet"),
        runs=shards_of("segment", "run.json"),
    output:
        table=f"{RESULTS}/{{dataset}}/segment/{{folder}}/segments.parquet",
        settings=f"{RESULTS}/{{dataset}}/segment/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/segment/{{folder}}/merge.log",
    wildcard_constraints:
        folder=PLAN.folders("segment"),
    conda:
        "../envs/gpu.yaml"
    params:
        code=CODE["segment"],
    script:
        "../scripts/segment.py"
