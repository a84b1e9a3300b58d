# Stage 4c: SAGHOG fine-tuning: the pretrained patch encoder + a NetRVLAD head, trained with a
# multi-similarity loss on the cluster pseudo labels of train patches (class-balanced batches).


rule finetune:
    input:
        backbone=lambda wc: f"{RESULTS}/{wc.dataset}/pretrain/{FINETUNE[wc.dataset][wc.ftvariant]['pretrain']}/backbone.pt",
        labels=lambda wc: f"{RESULTS}/{wc.dataset}/cluster/{FINETUNE[wc.dataset][wc.ftvariant]['cluster']}/patches.parquet",
        patches=lambda wc: patch_shards(wc.dataset, CLUSTER[wc.dataset][FINETUNE[wc.dataset][wc.ftvariant]["cluster"]]["patches"],
                                        "patches.npy"),
        shard_index=lambda wc: patch_shards(wc.dataset,
                                            CLUSTER[wc.dataset][FINETUNE[wc.dataset][wc.ftvariant]["cluster"]]["patches"],
                                            "parquet"),
    output:
        model=f"{RESULTS}/{{dataset}}/finetune/{{ftvariant}}/model.pt",
        log=f"{RESULTS}/{{dataset}}/finetune/{{ftvariant}}/log.parquet",
    params:
        code=CODE["finetune"],
        settings=lambda wc: {k: v for k, v in FINETUNE[wc.dataset][wc.ftvariant].items()
                             if k not in ("pretrain", "cluster", "model")},
        model=lambda wc: FINETUNE[wc.dataset][wc.ftvariant]["model"],
        device=lambda wc: saghog_feature(wc.dataset, "finetune", wc.ftvariant)["device"],
        out_dir=lambda wc: f"{RESULTS}/{wc.dataset}/finetune/{wc.ftvariant}",
    threads: 8
    resources:
        gpu=lambda wc: 0 if saghog_feature(wc.dataset, "finetune", wc.ftvariant)["device"] == "cpu" else 1,
    log:
        f"{RESULTS}/{{dataset}}/logs/finetune/{{ftvariant}}.log",
    conda:
        "../envs/gpu.yaml"
    script:
        "../scripts/finetune.py"
