# Stage 2: binarization (ink masks, stats, quality against ground truth), one job per shard of the index.


rule binarize_shard:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        segments=get_segment_shard,
        regions=get_regions_dir,
    output:
        table=f"{RESULTS}/{{dataset}}/binarize/{{folder}}/shards/{{shard}}.parquet",
        run=f"{RESULTS}/{{dataset}}/binarize/{{folder}}/shards/{{shard}}.run.json",
        masks=directory(f"{RESULTS}/{{dataset}}/binarize/{{folder}}/masks/{{shard}}"),
    log:
        f"{RESULTS}/{{dataset}}/logs/binarize/{{folder}}/{{shard}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/binarize/{{folder}}/{{shard}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("binarize"),
    conda:
        "../envs/cpu.yaml"
    params:
        code=CODE["binarize"],
        settings=result_settings("binarize"),
        shard_size=config["shard_size"],
    script:
        "../scripts/binarize.py"


rule binarize:
    input:
        tables=shards_of("binarize", "parquet"),
        runs=shards_of("binarize", "run.json"),
    output:
        stats=f"{RESULTS}/{{dataset}}/binarize/{{folder}}/stats.parquet",
        quality=f"{RESULTS}/{{dataset}}/binarize/{{folder}}/quality.parquet",
        settings=f"{RESULTS}/{{dataset}}/binarize/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/binarize/{{folder}}/merge.log",
    wildcard_constraints:
        folder=PLAN.folders("binarize"),
    conda:
        "../envs/cpu.yaml"
    params:
        code=CODE["binarize"],
    script:
        "../scripts/binarize.py"


rule binarize_quality_summary:
    input:
        get_binarize_quality,
    output:
        f"{RESULTS}/{{dataset}}/binarize/quality_summary.parquet",
    log:
        f"{RESULTS}/{{dataset}}/logs/binarize/quality_summary.log",
    conda:
        "../envs/cpu.yaml"
    params:
        code=CODE["binarize"],
        variants=get_binarize_variants,
    script:
        "../scripts/binarize.py"
