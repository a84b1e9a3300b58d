# Stage 3c: pseudo labels of the patches (RootSIFT -> PCA whitening -> k-means on train patches,
# ambiguous patches dropped), with a contact sheet of a few clusters for the report.


rule cluster:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        descriptors=get_patch_shards("cluster", "desc.npy"),
        shard_index=get_patch_shards("cluster", "parquet"),
        patches=get_patch_shards("cluster", "patches.npy"),
    output:
        labels=f"{RESULTS}/{{dataset}}/cluster/{{folder}}/patches.parquet",
        stats=f"{RESULTS}/{{dataset}}/cluster/{{folder}}/stats.parquet",
        summary=f"{RESULTS}/{{dataset}}/cluster/{{folder}}/summary.json",
        contact_sheet=f"{RESULTS}/{{dataset}}/cluster/{{folder}}/contact_sheet.png",
        settings=f"{RESULTS}/{{dataset}}/cluster/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/cluster/{{folder}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/cluster/{{folder}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("cluster"),
    conda:
        "../envs/cpu.yaml"
    threads: 2
    params:
        code=CODE["cluster"],
        settings=result_settings("cluster"),
    script:
        "../scripts/cluster.py"
