# Input functions shared by the rules: every variant comes from PLAN (writer_retrieval.plan), read
# through the named functions below (kept apart from the rules, as Snakemake's linter asks).


# Used across the workflow


def job_variant(stage, wc):
    return PLAN.job_variant(stage, wc)


def result_settings(stage):
    """Params function of a stage: its result settings (hashed; execution settings never reach params,
    since a param change re-runs a job)."""

    def get_result_settings(wc):
        return plain(job_variant(stage, wc).result)

    return get_result_settings


def stage_path(variant, *parts):
    return variant.path(RESULTS, *parts)


def upstream(stage, wc, role, *parts):
    """A file of the `role` input folder of this job's variant."""
    return stage_path(PLAN.input_of(job_variant(stage, wc), role), *parts)


def has_ground_truth(dataset):
    return config["datasets"][dataset]["adapter"] == "synthetic"


def shard_ids(dataset):
    """Shards of a dataset's index ('0000', ...); known once the dataset checkpoint has run."""
    import pyarrow.parquet as pq

    from writer_retrieval.binarize import n_shards

    index = checkpoints.dataset.get(dataset=dataset).output.index
    return [
        f"{i:04d}"
        for i in range(
            n_shards(pq.ParquetFile(index).metadata.num_rows, config["shard_size"])
        )
    ]


def shard_files(variant, *suffixes):
    """One file per shard of a sharded stage's folder, for each suffix."""
    return [
        stage_path(variant, "shards", f"{s}.{suffix}")
        for suffix in suffixes
        for s in shard_ids(variant.dataset)
    ]


def shards_of(stage, *suffixes):
    def get_shard_files(wc):
        return shard_files(job_variant(stage, wc), *suffixes)

    return get_shard_files


# Outputs that no later job reads (per stage folder and per shard) are requested by `all`, so that a
# deleted one re-runs its stage (Snakemake does not regenerate a missing input of an up-to-date job).
SIDE_OUTPUTS = {
    "segment": (["segments.parquet"], ["pages", "regions"]),
    "binarize": (["stats.parquet", "quality.parquet"], ["masks"]),
    "features": (["stats.parquet"], []),
    "embed": (["stats.parquet"], []),
    "embed_patches": (["stats.parquet"], []),
    "patches": (["stats.parquet"], []),
    "pretrain": (["checkpoint.pt", "inputs.json"], []),
    "finetune": (["checkpoint.pt"], []),
    "codebook": (["codebook.json"], []),
}


def get_side_outputs(wc):
    files = []
    for stage, (names, per_shard) in SIDE_OUTPUTS.items():
        for variant in (v for d in DATASETS for v in PLAN.variants(stage, d)):
            files += [stage_path(variant, name) for name in names]
            files += [
                stage_path(variant, name, s)
                for name in per_shard
                for s in shard_ids(variant.dataset)
            ]
    return files


def gpu_count(stage):
    """resources: gpu of a stage's jobs (a SLURM profile routes gpu > 0 to a GPU partition)."""

    def get_gpus(wc):
        execution = job_variant(stage, wc).execution
        return 0 if execution["device"] == "cpu" else execution.get("gpus", 1)

    return get_gpus


def pretrain_threads(wc):
    """A checkpoint used as it is (method none) is only checked and copied: one core, not eight."""
    return 1 if job_variant("pretrain", wc).result["method"] == "none" else 8


def used_clusters(dataset):
    """Pseudo-label folders of the SAGHOG extractors the experiments use on `dataset` (the plan
    holds only the stages experiments use)."""
    return sorted(v.folder for v in PLAN.variants("cluster", dataset))


def code_version_of(variant):
    if variant.stage == "pretrain":
        return PRETRAIN_CODE[variant.result["method"]]
    return CODE[STAGE_SCRIPTS.get(variant.stage, variant.stage)]


def get_code_version(stage):
    def get_stage_code_version(wc):
        return code_version_of(job_variant(stage, wc))

    return get_stage_code_version


def experiment_code_version(wc):
    """The code version of every stage on an experiment's path, recorded in its metrics row."""
    path = PLAN.path_of(job_variant("experiment", wc))
    return settings_hash(
        "code",
        {"dataset": CODE["dataset"], **{v.stage: code_version_of(v) for v in path}},
    )


def get_experiment_labels(wc):
    variant = job_variant("experiment", wc)
    return {
        "dataset": variant.dataset,
        **plain(variant.labels),
        "settings_hash": variant.hash,
    }


def get_path_settings(wc):
    """settings.json of every stage on an experiment's path (per-stage seconds and device in its row)."""
    return [
        stage_path(v, "settings.json")
        for v in PLAN.path_of(job_variant("experiment", wc))[:-1]
    ]


def experiment_files(name):
    return [stage_path(e, name) for e in PLAN.experiments]


# Used by rules/dataset.smk


def get_dataset_settings(wc):
    return config["datasets"][wc.dataset]


def get_dataset_manifest(wc):
    """Names, sizes and mtimes of the files under root (no image is decoded): a changed file re-runs."""
    from writer_retrieval.dataset import source_manifest

    return source_manifest(config["datasets"][wc.dataset])


# Used by rules/segment.smk and rules/binarize.smk


def get_segment_shard(wc):
    """sam+X binarizers wait for the page regions of their shard."""
    variant = job_variant("binarize", wc)
    return (
        [upstream("binarize", wc, "segment", "shards", f"{wc.shard}.parquet")]
        if "segment" in variant.inputs
        else []
    )


def get_regions_dir(wc):
    variant = job_variant("binarize", wc)
    return (
        [upstream("binarize", wc, "segment", "regions", wc.shard)]
        if "segment" in variant.inputs
        else []
    )


def get_binarize_variants(wc):
    return [v.folder for v in PLAN.variants("binarize", wc.dataset)]


def get_binarize_quality(wc):
    return [
        stage_path(v, "quality.parquet") for v in PLAN.variants("binarize", wc.dataset)
    ]


def get_main_masks(wc):
    return stage_path(PLAN.main_binarize(wc.dataset), "stats.parquet")


# Used by the feature stages (features, patches, cluster, pretrain, finetune, embed, embed_patches)


def get_patch_shards(stage, *suffixes):
    def get_patch_shard_files(wc):
        variant = job_variant(stage, wc)
        return shard_files(PLAN.input_of(variant, "patches"), *suffixes)

    return get_patch_shard_files


def get_patch_shard(stage, suffix):
    def get_patch_shard_file(wc):
        return upstream(stage, wc, "patches", "shards", f"{wc.shard}.{suffix}")

    return get_patch_shard_file


def get_pretrain_masks(wc):
    """Window methods train on page masks; SAGHOG on patch shards."""
    return (
        get_main_masks(wc) if "binarize" in job_variant("pretrain", wc).inputs else []
    )


def get_pretrain_segments(wc):
    """With SAM preprocessing, pages with too little writing are left out of pretraining."""
    variant = job_variant("pretrain", wc)
    return (
        [upstream("pretrain", wc, "segment", "segments.parquet")]
        if "segment" in variant.inputs
        else []
    )


def get_pretrain_patches(suffix):
    def get_pretrain_patch_files(wc):
        return (
            get_patch_shards("pretrain", suffix)(wc)
            if "patches" in job_variant("pretrain", wc).inputs
            else []
        )

    return get_pretrain_patch_files


def get_backbone(stage):
    """The pretrained backbone of an embedding variant, or nothing for an untrained (random) ViT."""

    def get_backbone_file(wc):
        variant = job_variant(stage, wc)
        return (
            [upstream(stage, wc, "pretrain", "backbone.pt")]
            if "pretrain" in variant.inputs
            else []
        )

    return get_backbone_file


def get_finetuned(wc):
    variant = job_variant("embed_patches", wc)
    return (
        [upstream("embed_patches", wc, "finetune", "model.pt")]
        if "finetune" in variant.inputs
        else []
    )


def get_output_dir(stage):
    def get_stage_dir(wc):
        return stage_path(job_variant(stage, wc))

    return get_stage_dir


# Used by rules/vlad.smk


def features_variant_of(stage, wc):
    """The page-features variant (SIFT, ViT tokens, SAGHOG vectors) a codebook, VLAD or descriptor reads."""
    return PLAN.input_of(job_variant(stage, wc), "features")


def get_local_descriptors(stage, suffix=None):
    """Local descriptors (VLAD input) of every shard, or of this job's shard."""

    def get_local_files(wc):
        variant = features_variant_of(stage, wc)
        name = suffix or KINDS[variant.labels["kind"]].local
        if "shard" in wc.keys():
            return stage_path(variant, "shards", f"{wc.shard}.{name}")
        return shard_files(variant, name)

    return get_local_files


def get_codebook(wc):
    return upstream("vlad", wc, "codebook", "codebook.npy")


def get_feature_kind(stage):
    def get_kind(wc):
        return features_variant_of(stage, wc).labels["kind"]

    return get_kind


# Used by rules/pca.smk


def get_pooled(what):
    """Per-shard page vectors (VLAD, SAGHOG), or window [CLS] tokens to sum per page."""

    def get_pooled_files(wc):
        variant = job_variant("descriptors", wc)
        if variant.labels["aggregation"] == "vlad":
            vlad = PLAN.input_of(variant, "vlad")
            return shard_files(vlad, {"vectors": "npy", "doc_ids": "parquet"}[what])
        features = features_variant_of("descriptors", wc)
        vectors, doc_ids = KINDS[features.labels["kind"]].pooled
        return shard_files(features, vectors if what == "vectors" else doc_ids)

    return get_pooled_files


def get_fitted_whitening(wc):
    """Cross-dataset transfer: the PCA fit on the train_on dataset's train split."""
    variant = job_variant("descriptors", wc)
    return (
        [upstream("descriptors", wc, "whitening", "whitening.npz")]
        if "whitening" in variant.inputs
        else []
    )


def get_one_row_per_page(wc):
    variant = job_variant("descriptors", wc)
    return (
        variant.labels["aggregation"] == "vlad"
        or KINDS[variant.labels["kind"]].one_row_per_page
    )


# Used by rules/rerank.smk and rules/retrieval.smk


def get_descriptors(stage, name):
    def get_descriptor_file(wc):
        return upstream(stage, wc, "descriptors", name)

    return get_descriptor_file


def get_rerank_pages(wc):
    """The index (pages of the documents) when the rerank graph leaves same-page documents out."""
    graph = job_variant("rerank", wc).result["graph"]
    return [f"{RESULTS}/{wc.dataset}/index.parquet"] if graph == "other_pages" else []


# Used by rules/esvm.smk


def get_esvm_negatives(wc):
    """The descriptors whose train rows are the negatives: the dataset's own, or train_on's."""
    role = (
        "negatives" if "negatives" in job_variant("esvm", wc).inputs else "descriptors"
    )
    return upstream("esvm", wc, role, "descriptors.parquet")


def get_reranked(wc):
    variant = job_variant("experiment", wc)
    return (
        [upstream("experiment", wc, "rerank", "reranked.npz")]
        if "rerank" in variant.inputs
        else []
    )


# Used by rules/report.smk


def training_logs():
    """Logs of the runs that trained (a checkpoint used as it is, method none, logs no epoch)."""
    return [
        stage_path(v, "log.parquet")
        for d in DATASETS
        for s in ("pretrain", "finetune")
        for v in PLAN.variants(s, d)
        if v.name != "none"
    ]


def cluster_files(name):
    return [
        stage_path(PLAN.variant("cluster", d, c), name)
        for d in DATASETS
        for c in used_clusters(d)
    ]


# Used by rules/finetune.smk


def get_cluster_labels(wc):
    return upstream("finetune", wc, "cluster", "patches.parquet")
