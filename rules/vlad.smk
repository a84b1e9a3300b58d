# Stage 4: VLAD codebook (k-means on a seeded sample of train descriptors) and encoding per shard.


rule vlad_codebook:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        descriptors=get_local_descriptors("codebook"),
        shard_index=get_local_descriptors("codebook", "parquet"),
    output:
        codebook=f"{RESULTS}/{{dataset}}/codebook/{{folder}}/codebook.npy",
        info=f"{RESULTS}/{{dataset}}/codebook/{{folder}}/codebook.json",
        settings=f"{RESULTS}/{{dataset}}/codebook/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/codebook/{{folder}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/codebook/{{folder}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("codebook"),
    conda:
        "../envs/cpu.yaml"
    threads: 4
    params:
        code=CODE["vlad"],
        settings=result_settings("codebook"),
        kind=get_feature_kind("codebook"),
    script:
        "../scripts/vlad.py"


rule vlad_shard:
    input:
        codebook=get_codebook,
        descriptors=get_local_descriptors("vlad"),
        shard_index=get_local_descriptors("vlad", "parquet"),
    output:
        vectors=f"{RESULTS}/{{dataset}}/vlad/{{folder}}/shards/{{shard}}.npy",
        doc_ids=f"{RESULTS}/{{dataset}}/vlad/{{folder}}/shards/{{shard}}.parquet",
        run=f"{RESULTS}/{{dataset}}/vlad/{{folder}}/shards/{{shard}}.run.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/vlad/{{folder}}/{{shard}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/vlad/{{folder}}/{{shard}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("vlad"),
    conda:
        "../envs/cpu.yaml"
    params:
        code=CODE["vlad"],
        settings=result_settings("vlad"),
        kind=get_feature_kind("vlad"),
    script:
        "../scripts/vlad.py"


rule vlad:
    input:
        runs=shards_of("vlad", "run.json"),
    output:
        settings=f"{RESULTS}/{{dataset}}/vlad/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/vlad/{{folder}}/merge.log",
    wildcard_constraints:
        folder=PLAN.folders("vlad"),
    conda:
        "../envs/cpu.yaml"
    params:
        code=CODE["vlad"],
    script:
        "../scripts/vlad.py"
