# Stage 3c: pseudo labels of the patches (RootSIFT -> PCA whitening -> k-means on train patches,
# ambiguous patches dropped), with a contact sheet of a few clusters for the report.


rule cluster:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        descriptors=lambda wc: patch_shards(wc.dataset, cluster_patches(wc), "desc.npy"),
        shard_index=lambda wc: patch_shards(wc.dataset, cluster_patches(wc), "parquet"),
        patches=lambda wc: patch_shards(wc.dataset, cluster_patches(wc), "patches.npy"),
    output:
        labels=f"{RESULTS}/{{dataset}}/cluster/{{clvariant}}/patches.parquet",
        stats=f"{RESULTS}/{{dataset}}/cluster/{{clvariant}}/stats.parquet",
        summary=f"{RESULTS}/{{dataset}}/cluster/{{clvariant}}/summary.json",
        contact_sheet=f"{RESULTS}/{{dataset}}/cluster/{{clvariant}}/contact_sheet.png",
    params:
        code=CODE["cluster"],
        settings=lambda wc: {k: v for k, v in CLUSTER[wc.dataset][wc.clvariant].items() if k != "patches"},
    threads: 2
    log:
        f"{RESULTS}/{{dataset}}/logs/cluster/{{clvariant}}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/cluster.py"
