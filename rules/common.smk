# Input functions and lookups shared by the rules (kept apart from the rules, as Snakemake's linter asks).


# Used across the workflow


def experiment_code_version(exp):
    """The code version of every stage on an experiment's path, recorded in its metrics row."""
    stages = ["dataset", "binarize", *(["segment"] if uses_sam(config) else []),
              *STAGES_OF_KIND[config["features"][exp["features"]]["kind"]], "pca",
              *(["rerank"] if exp["rerank"] != "none" else []), "retrieval"]
    return settings_hash("code", {stage: CODE[stage] for stage in stages})


def has_ground_truth(dataset):
    return config["datasets"][dataset]["adapter"] == "synthetic"


def feature_kind(dataset, fvariant):
    return FEATURES[dataset][fvariant]["kind"]


def variants_of_kind(kind):
    """Regex alternatives of the feature folders of one kind (rules producing them are kind-specific)."""
    names = sorted({v for d in FEATURES for v, s in FEATURES[d].items() if s["kind"] == kind})
    return "|".join(map(re.escape, names)) or "(?!)"


def used_clusters(dataset):
    """Pseudo-label folders of the SAGHOG extractors an experiment on `dataset` uses."""
    return sorted({cluster_variant(config, dataset, e["features"])[0] for e in GRID
                   if e["dataset"] == dataset and e["features"] in SAGHOG_FEATURES})


def shard_ids(dataset):
    """Shards of a dataset's index ('0000', ...); known once the dataset checkpoint has run."""
    import pyarrow.parquet as pq

    from writer_retrieval.binarize import n_shards

    index = checkpoints.dataset.get(dataset=dataset).output.index
    return [f"{i:04d}" for i in range(n_shards(pq.ParquetFile(index).metadata.num_rows, config["shard_size"]))]


# Used by rules/binarize.smk


def binarize_shard_tables(wc):
    return [f"{RESULTS}/{wc.dataset}/binarize/{wc.variant}/shards/{s}.parquet" for s in shard_ids(wc.dataset)]


def segment_shard_table(wc):
    """sam+X binarizers wait for the page regions of their shard."""
    segment = BINARIZE[wc.dataset][wc.variant].get("segment")
    return [f"{RESULTS}/{wc.dataset}/segment/{segment}/shards/{wc.shard}.parquet"] if segment else []


# Used by rules/features.smk


def main_masks(wc):
    return f"{RESULTS}/{wc.dataset}/binarize/{main_binarize_variant(config, wc.dataset)}/stats.parquet"


# Used by rules/patches.smk


def saghog_feature(dataset, stage, variant):
    """The settings of a SAGHOG extractor whose `stage` folder (patches, cluster, finetune) is `variant`."""
    of = {"patches": patches_variant, "cluster": cluster_variant, "finetune": finetune_variant}[stage]
    for name in SAGHOG_FEATURES:
        v = of(config, dataset, name)
        if v and v[0] == variant:
            return config["features"][name]
    raise ValueError(f"no SAGHOG feature extractor uses {stage} folder {variant}")


def patch_shards(dataset, patchvariant, suffix):
    return [f"{RESULTS}/{dataset}/patches/{patchvariant}/shards/{s}.{suffix}" for s in shard_ids(dataset)]


# Used by rules/cluster.smk


def cluster_patches(wc):
    return CLUSTER[wc.dataset][wc.clvariant]["patches"]


# Used by rules/pretrain.smk


def pretrain_settings(wc):
    return PRETRAIN[wc.dataset][wc.pvariant]


def pretrain_feature(wc):
    """The settings of a feature extractor that uses this pretraining run (device, gpus)."""
    for name, feat in config["features"].items():
        variant = pretrain_variant(config, wc.dataset, name)
        if variant and variant[0] == wc.pvariant:
            return feat
    raise ValueError(f"no feature extractor uses pretraining run {wc.pvariant}")


def pretrain_patches(wc, suffix):
    """SAGHOG trains on patch shards; the window methods on page masks."""
    settings = PRETRAIN[wc.dataset][wc.pvariant]
    return patch_shards(wc.dataset, settings["patches"], suffix) if "patches" in settings else []


# Used by rules/embed.smk


def embed_backbone(wc):
    """The pretrained backbone, or nothing for an untrained (random) ViT."""
    for feature in config["features"]:
        if features_variant(config, wc.dataset, feature)[0] == wc.fvariant:
            variant = pretrain_variant(config, wc.dataset, feature)
            return [f"{RESULTS}/{wc.dataset}/pretrain/{variant[0]}/backbone.pt"] if variant else []
    return []


def saghog_models(wc):
    """The SAGHOG patch encoder (pretrain stage) and, when fine-tuned, the NetRVLAD model."""
    for feature in SAGHOG_FEATURES:
        if features_variant(config, wc.dataset, feature)[0] == wc.fvariant:
            tuned = finetune_variant(config, wc.dataset, feature)
            return {"backbone": f"{RESULTS}/{wc.dataset}/pretrain/{pretrain_variant(config, wc.dataset, feature)[0]}/backbone.pt",
                    "finetuned": [f"{RESULTS}/{wc.dataset}/finetune/{tuned[0]}/model.pt"] if tuned else [],
                    "patches": patches_variant(config, wc.dataset, feature)[0]}
    raise ValueError(f"{wc.fvariant} is not a SAGHOG feature extractor")


# Used by rules/vlad.smk


# Local descriptors of each feature kind: SIFT descriptors or ViT foreground patch tokens.
LOCAL_SUFFIX = {"sift": "desc.npy", "vit": "tokens.npy"}


def feature_shards(dataset, fvariant, suffix):
    if suffix == "local":
        suffix = LOCAL_SUFFIX[feature_kind(dataset, fvariant)]
    return [f"{RESULTS}/{dataset}/features/{fvariant}/shards/{s}.{suffix}" for s in shard_ids(dataset)]


def vlad_input(wc, what):
    settings = VLAD[wc.dataset][wc.vvariant]
    if what == "codebook":
        return f"{RESULTS}/{wc.dataset}/codebook/{settings['codebook']}/codebook.npy"
    if what == "local":
        what = LOCAL_SUFFIX[feature_kind(wc.dataset, settings["features"])]
    return f"{RESULTS}/{wc.dataset}/features/{settings['features']}/shards/{wc.shard}.{what}"


# Used by rules/pca.smk


def pooled_inputs(wc, what):
    """Per-shard page vectors (one row per page: VLAD, SAGHOG), or window [CLS] tokens to sum."""
    settings = DESCRIPTORS[wc.dataset][wc.dvariant]
    if settings["aggregation"] == "sum" and feature_kind(wc.dataset, settings["features"]) == "saghog":
        suffix = {"vectors": "pooled.npy", "doc_ids": "pooled.parquet"}[what]
        return [f"{RESULTS}/{wc.dataset}/features/{settings['features']}/shards/{s}.{suffix}" for s in shard_ids(wc.dataset)]
    if settings["aggregation"] == "vlad":
        suffix = {"vectors": "npy", "doc_ids": "parquet"}[what]
        return [f"{RESULTS}/{wc.dataset}/vlad/{settings['vlad']}/shards/{s}.{suffix}" for s in shard_ids(wc.dataset)]
    suffix = {"vectors": "cls.npy", "doc_ids": "parquet"}[what]
    return [f"{RESULTS}/{wc.dataset}/features/{settings['features']}/shards/{s}.{suffix}" for s in shard_ids(wc.dataset)]


# Used by rules/rerank.smk


RERANKED = {(e["dataset"], e["reranked"]): e for e in GRID if e["reranked"]}


# Used by rules/report.smk


def experiment_files(name):
    return [f"{RESULTS}/{e['dataset']}/experiments/{e['folder']}/{name}" for e in GRID]
