# Stage 2a: Segment-Anything page segmentation (SAGHOG preprocessing): page region, cleaned and
# cropped page, and the writing-amount filter for pretraining; one job per shard of the index.


rule segment_shard:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
    output:
        f"{RESULTS}/{{dataset}}/segment/{{svariant}}/shards/{{shard}}.parquet",
    params:
        code=CODE["segment"],
        settings=lambda wc: SEGMENT[wc.dataset][1],
        shard_size=config["shard_size"],
        out_dir=lambda wc: f"{RESULTS}/{wc.dataset}/segment/{wc.svariant}",
    threads: 2
    resources:
        gpu=lambda wc: 0 if config["preprocess"]["sam"]["device"] == "cpu" else 1,
    log:
        f"{RESULTS}/{{dataset}}/logs/segment/{{svariant}}/{{shard}}.log",
    conda:
        "../envs/gpu.yaml"
    script:
        "../scripts/segment.py"


rule segment:
    input:
        lambda wc: [f"{RESULTS}/{wc.dataset}/segment/{wc.svariant}/shards/{s}.parquet" for s in shard_ids(wc.dataset)],
    output:
        f"{RESULTS}/{{dataset}}/segment/{{svariant}}/segments.parquet",
    params:
        code=CODE["segment"],
    log:
        f"{RESULTS}/{{dataset}}/logs/segment/{{svariant}}/merge.log",
    conda:
        "../envs/gpu.yaml"
    script:
        "../scripts/segment.py"
