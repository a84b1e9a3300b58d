# Stage 2: binarization (ink masks, stats, quality against ground truth), one job per shard of the index.


def binarize_shard_tables(wc):
    return [f"{RESULTS}/{wc.dataset}/binarize/{wc.variant}/shards/{s}.parquet" for s in shard_ids(wc.dataset)]


def segment_shard_table(wc):
    """sam+X binarizers wait for the page regions of their shard."""
    segment = BINARIZE[wc.dataset][wc.variant].get("segment")
    return [f"{RESULTS}/{wc.dataset}/segment/{segment}/shards/{wc.shard}.parquet"] if segment else []


rule binarize_shard:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        segments=segment_shard_table,
    output:
        f"{RESULTS}/{{dataset}}/binarize/{{variant}}/shards/{{shard}}.parquet",
    params:
        settings=lambda wc: BINARIZE[wc.dataset][wc.variant],
        shard_size=config["shard_size"],
        masks_dir=lambda wc: f"{RESULTS}/{wc.dataset}/binarize/{wc.variant}/masks",
        regions_dir=lambda wc: f"{RESULTS}/{wc.dataset}/segment/{s}/regions"
        if (s := BINARIZE[wc.dataset][wc.variant].get("segment"))
        else None,
    log:
        f"{RESULTS}/{{dataset}}/logs/binarize/{{variant}}/{{shard}}.log",
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
        settings=lambda wc: BINARIZE[wc.dataset][wc.variant],
    log:
        f"{RESULTS}/{{dataset}}/logs/binarize/{{variant}}/merge.log",
    script:
        "../scripts/binarize.py"


rule binarize_quality_summary:
    input:
        lambda wc: [f"{RESULTS}/{wc.dataset}/binarize/{v}/quality.parquet" for v in BINARIZE[wc.dataset]],
    output:
        f"{RESULTS}/{{dataset}}/binarize/quality_summary.parquet",
    params:
        variants=lambda wc: list(BINARIZE[wc.dataset]),
    log:
        f"{RESULTS}/{{dataset}}/logs/binarize/quality_summary.log",
    script:
        "../scripts/binarize.py"
