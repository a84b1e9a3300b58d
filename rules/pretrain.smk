# Stage 4a: self-supervised pretraining on the train split: a ViT backbone on windows of binarized pages
# (AttMask, or a spatial-context pretext task), or SAGHOG's masked-HOG autoencoder on patches.
# GPU when present (resources gpu=1 lets a SLURM profile route it); gpus > 1 runs torch DDP via torchrun.
# A killed run resumes from checkpoint.pt (kept beside the outputs) when the job is started again.


rule pretrain:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        masks=lambda wc: [] if "patches" in PRETRAIN[wc.dataset][wc.pvariant] else main_masks(wc),
        # With SAM preprocessing, pages with too little writing are left out of pretraining.
        segments=lambda wc: [f"{RESULTS}/{wc.dataset}/segment/{SEGMENT[wc.dataset][0]}/segments.parquet"]
        if "segment" in PRETRAIN[wc.dataset][wc.pvariant]
        else [],
        patches=lambda wc: pretrain_patches(wc, "patches.npy"),
        shard_index=lambda wc: pretrain_patches(wc, "parquet"),
    output:
        backbone=f"{RESULTS}/{{dataset}}/pretrain/{{pvariant}}/backbone.pt",
        log=f"{RESULTS}/{{dataset}}/pretrain/{{pvariant}}/log.parquet",
    params:
        code=CODE["pretrain"],
        settings=pretrain_settings,
        device=lambda wc: pretrain_feature(wc)["device"],
        gpus=lambda wc: pretrain_feature(wc)["gpus"],
        out_dir=lambda wc: f"{RESULTS}/{wc.dataset}/pretrain/{wc.pvariant}",
    threads: 8
    resources:
        gpu=lambda wc: pretrain_feature(wc)["gpus"] if pretrain_feature(wc)["device"] != "cpu" else 0,
    log:
        f"{RESULTS}/{{dataset}}/logs/pretrain/{{pvariant}}.log",
    conda:
        "../envs/gpu.yaml"
    script:
        "../scripts/pretrain.py"
