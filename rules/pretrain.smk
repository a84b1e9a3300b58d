# Stage 4a: self-supervised pretraining on the train split: a ViT backbone on windows of binarized pages
# (AttMask, or a spatial-context pretext task), or SAGHOG's masked-HOG autoencoder on patches.
# GPU when present (resources gpu=1 lets a SLURM profile route it); gpus > 1 runs torch DDP via torchrun.
# A killed run resumes from resume/checkpoint.pt (not an output, so Snakemake keeps it after a failure)
# when the job is started again; a finished run moves it to checkpoint.pt.


rule pretrain:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        masks=get_pretrain_masks,
        segments=get_pretrain_segments,
        patches=get_pretrain_patches("patches.npy"),
        shard_index=get_pretrain_patches("parquet"),
    output:
        backbone=f"{RESULTS}/{{dataset}}/pretrain/{{folder}}/backbone.pt",
        log=f"{RESULTS}/{{dataset}}/pretrain/{{folder}}/log.parquet",
        checkpoint=f"{RESULTS}/{{dataset}}/pretrain/{{folder}}/checkpoint.pt",
        inputs=f"{RESULTS}/{{dataset}}/pretrain/{{folder}}/inputs.json",
        settings=f"{RESULTS}/{{dataset}}/pretrain/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/pretrain/{{folder}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/pretrain/{{folder}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("pretrain"),
    # The long pole (hours on a GPU, and what its extractor's embedding waits for): start it first.
    priority: 2
    conda:
        "../envs/gpu.yaml"
    threads: pretrain_threads
    resources:
        gpu=gpu_count("pretrain"),
    params:
        code=get_code_version("pretrain"),
        settings=result_settings("pretrain"),
        out_dir=get_output_dir("pretrain"),
    script:
        "../scripts/pretrain.py"
