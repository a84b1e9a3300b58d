# writer-retrieval: reproducible writer-retrieval benchmarks (see README.md).
# Stages live in rules/<stage>.smk, glue in scripts/<stage>.py, logic in src/writer_retrieval/<stage>.py.
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from writer_retrieval.config import (
    ConfigError,
    binarize_variants,
    cluster_variant,
    codebook_variant,
    descriptors_variant,
    experiment_grid,
    features_variant,
    finetune_variant,
    main_binarize_variant,
    patches_variant,
    pretrain_variant,
    segment_variant,
    uses_sam,
    validate_config,
    vlad_variant,
)

min_version("9.0")


# config.yaml is the embedded default; a --configfile on the command line replaces it entirely
# (rather than being merged into it), so a cluster config never inherits the demo's settings.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"



# Validate before any job: an unknown or mistyped key stops here with the key and what is allowed.
try:
    config.update(validate_config(config))
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

DATASETS = sorted({exp["dataset"] for exp in config["experiments"]})
RESULTS = "results"
# Folder name -> effective settings, per dataset and stage (names carry a hash of the settings).
BINARIZE = {d: binarize_variants(config, d) for d in config["datasets"]}
SEGMENT = {d: segment_variant(config, d) for d in config["datasets"]}
FEATURES = {d: dict(features_variant(config, d, f) for f in config["features"]) for d in config["datasets"]}
CODEBOOK = {d: dict(codebook_variant(config, d, f) for f in config["features"]) for d in config["datasets"]}
VLAD = {d: dict(vlad_variant(config, d, f) for f in config["features"]) for d in config["datasets"]}
DESCRIPTORS = {
    d: dict(descriptors_variant(config, d, f, a) for f in config["features"] for a in config["features"][f]["aggregations"])
    for d in config["datasets"]
}
PRETRAIN = {d: dict(v for f in config["features"] if (v := pretrain_variant(config, d, f))) for d in config["datasets"]}
SAGHOG_FEATURES = [f for f in config["features"] if config["features"][f]["kind"] == "saghog"]
PATCHES = {d: dict(patches_variant(config, d, f) for f in SAGHOG_FEATURES) for d in config["datasets"]}
CLUSTER = {d: dict(cluster_variant(config, d, f) for f in SAGHOG_FEATURES) for d in config["datasets"]}
FINETUNE = {d: dict(v for f in SAGHOG_FEATURES if (v := finetune_variant(config, d, f))) for d in config["datasets"]}
GRID = experiment_grid(config)
EXPERIMENTS = {(e["dataset"], e["folder"]): e for e in GRID}


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


wildcard_constraints:
    dataset="|".join(map(re.escape, config["datasets"])),
    variant=r"[a-z0-9+]+-[0-9a-f]{10}",
    svariant=r"sam-[0-9a-f]{10}",
    fvariant=r"[A-Za-z0-9_.-]+-[0-9a-f]{10}",
    cvariant=r"[A-Za-z0-9_.-]+-[0-9a-f]{10}",
    vvariant=r"[A-Za-z0-9_.-]+-[0-9a-f]{10}",
    pvariant=r"[a-z0-9_]+-[0-9a-f]{10}",
    patchvariant=r"patches-[0-9a-f]{10}",
    clvariant=r"cluster-[0-9a-f]{10}",
    ftvariant=r"[a-z0-9_]+-[0-9a-f]{10}",
    dvariant=r"[A-Za-z0-9_.-]+-(vlad|sum)-[0-9a-f]{10}",
    experiment=r"[A-Za-z0-9_.-]+-(vlad|sum)-[A-Za-z0-9_.]+-[0-9a-f]{10}",
    rvariant=r"[A-Za-z0-9_.-]+-(vlad|sum)-[A-Za-z0-9_.]+-[0-9a-f]{10}",
    shard=r"\d{4}",


include: "rules/dataset.smk"
include: "rules/segment.smk"
include: "rules/binarize.smk"
include: "rules/features.smk"
include: "rules/patches.smk"
include: "rules/cluster.smk"
include: "rules/pretrain.smk"
include: "rules/finetune.smk"
include: "rules/embed.smk"
include: "rules/vlad.smk"
include: "rules/pca.smk"
include: "rules/rerank.smk"
include: "rules/retrieval.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        [f"{RESULTS}/{d}/index.parquet" for d in DATASETS],
        [f"{RESULTS}/{d}/binarize/{v}/stats.parquet" for d in DATASETS for v in BINARIZE[d]],
        [f"{RESULTS}/{d}/binarize/quality_summary.parquet" for d in DATASETS if has_ground_truth(d)],
        [f"{RESULTS}/{d}/segment/{SEGMENT[d][0]}/segments.parquet" for d in DATASETS if uses_sam(config)],
        [f"{RESULTS}/{e['dataset']}/features/{features_variant(config, e['dataset'], e['features'])[0]}/stats.parquet"
         for e in GRID],
        [f"{RESULTS}/{d}/cluster/{c}/contact_sheet.png" for d in DATASETS for c in used_clusters(d)],
        f"{RESULTS}/benchmark.parquet",
        f"{RESULTS}/report.html",
