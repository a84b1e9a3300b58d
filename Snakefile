# writer-retrieval: reproducible writer-retrieval benchmarks (see README.md).
# Stages live in rules/<stage>.smk, glue in scripts/<stage>.py, logic in src/writer_retrieval/<stage>.py.
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

# The workflow's own code comes from its src/ (this file and every job, through PYTHONPATH), so a
# conda environment (--sdm conda) needs only the dependencies, and a copy of the workflow runs its code.
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
os.environ.update(PYTHONPATH=os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])]))

from writer_retrieval.config import (
    ConfigError,
    binarize_variants,
    cluster_variant,
    code_version,
    codebook_variant,
    descriptors_variant,
    experiment_grid,
    features_variant,
    finetune_variant,
    main_binarize_variant,
    patches_variant,
    pretrain_variant,
    segment_variant,
    settings_hash,
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
# Code version of every stage (its script and the library modules it imports): a rule param, so an
# edit re-runs the stages that depend on the edited code and what follows them, nothing else.
CODE = {s: code_version(s, workflow.basedir) for s in ("dataset", "segment", "binarize", "features", "patches",
                                                       "cluster", "pretrain", "finetune", "embed", "vlad", "pca",
                                                       "rerank", "retrieval", "report")}
STAGES_OF_KIND = {"sift": ["features", "vlad"], "vit": ["pretrain", "embed", "vlad"],
                  "saghog": ["patches", "cluster", "pretrain", "finetune", "embed"]}


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


include: "rules/common.smk"
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
