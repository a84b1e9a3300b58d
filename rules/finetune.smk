# Stage 4c: SAGHOG fine-tuning: the pretrained patch encoder + a NetRVLAD head, trained with a
# multi-similarity loss on the cluster pseudo labels of train patches (class-balanced batches),
# early-stopped on the mAP of held-out train writers (their writers come from the dataset index).
# Resumes like pretraining (resume/checkpoint.pt, moved to checkpoint.pt when done).


rule finetune:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        backbone=get_backbone("finetune"),
        labels=get_cluster_labels,
        patches=get_patch_shards("finetune", "patches.npy"),
        shard_index=get_patch_shards("finetune", "parquet"),
    output:
        model=f"{RESULTS}/{{dataset}}/finetune/{{folder}}/model.pt",
        log=f"{RESULTS}/{{dataset}}/finetune/{{folder}}/log.parquet",
        checkpoint=f"{RESULTS}/{{dataset}}/finetune/{{folder}}/checkpoint.pt",
        settings=f"{RESULTS}/{{dataset}}/finetune/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/finetune/{{folder}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/finetune/{{folder}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("finetune"),
    priority: 2
    conda:
        "../envs/gpu.yaml"
    threads: 8
    resources:
        gpu=gpu_count("finetune"),
    params:
        code=CODE["finetune"],
        settings=result_settings("finetune"),
        out_dir=get_output_dir("finetune"),
    script:
        "../scripts/finetune.py"
