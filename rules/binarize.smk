# Stage 2: binarization (ink masks, stats, quality against ground truth), one job per shard of the index.


rule binarize_shard:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        segments=segment_shard_table,
    output:
        f"{RESULTS}/{{dataset}}/binarize/{{variant}}/shards/{{shard}}.parquet",
    params:
        code=CODE["binarize"],
        settings=lambda wc: BINARIZE[wc.dataset][wc.variant],
        shard_size=config["shard_size"],
        masks_dir=lambda wc: f"{RESULTS}/{wc.dataset}/binarize/{wc.variant}/masks",
        regions_dir=lambda wc: f"{RESULTS}/{wc.dataset}/segment/{s}/regions"
        if (s := BINARIZE[wc.dataset][wc.variant].get("segment"))
        else None,
    log:
        f"{RESULTS}/{{dataset}}/logs/binarize/{{variant}}/{{shard}}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/binarize.py"


rule binarize:
    input:
        binarize_shard_tables,
    output:
        stats=f"{RESULTS}/{{dataset}}/binarize/{{variant}}/stats.parquet",
        quality=f"{RESULTS}/{{dataset}}/binarize/{{variant}}/quality.parquet",
        settings=f"{RESULTS}/{{dataset}}/binarize/{{variant}}/settings.json",
    params:
        code=CODE["binarize"],
        settings=lambda wc: BINARIZE[wc.dataset][wc.variant],
    log:
        f"{RESULTS}/{{dataset}}/logs/binarize/{{variant}}/merge.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/binarize.py"


rule binarize_quality_summary:
    input:
        lambda wc: [f"{RESULTS}/{wc.dataset}/binarize/{v}/quality.parquet" for v in BINARIZE[wc.dataset]],
    output:
        f"{RESULTS}/{{dataset}}/binarize/quality_summary.parquet",
    params:
        code=CODE["binarize"],
        variants=lambda wc: list(BINARIZE[wc.dataset]),
    log:
        f"{RESULTS}/{{dataset}}/logs/binarize/quality_summary.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/binarize.py"
