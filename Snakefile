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
os.environ.update(
    PYTHONPATH=os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])])
)

from writer_retrieval.config import (
    PRETRAIN_MODULES,
    ConfigError,
    check_dataset_roots,
    code_version,
    pretrain_code_skip,
    settings_hash,
    validate_config,
)
from writer_retrieval.plan import KINDS, Plan, plain, used_datasets

min_version("9.0")


report: "report/workflow.rst"


# config.yaml is the embedded default; a --configfile on the command line replaces it entirely
# (rather than being merged into it), so a cluster config never inherits the demo's settings.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


# Validate before any job: an unknown or mistyped key stops here with the key and what is allowed.
try:
    config.update(validate_config(config))
    DATASETS = used_datasets(
        config
    )  # retrieved on, or trained on by another dataset's experiments
    check_dataset_roots(config, DATASETS)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None
RESULTS = "results"
# Every stage variant of every experiment (folder names carry a hash of the result settings).
PLAN = Plan(config)
# Code version of every stage (its script and the library modules it imports): a rule param, so an
# edit re-runs the stages that depend on the edited code and what follows them, nothing else.
STAGE_SCRIPTS = {"codebook": "vlad", "descriptors": "pca", "experiment": "retrieval"}
CODE = {
    s: code_version(s, workflow.basedir)
    for s in (
        "dataset",
        "segment",
        "binarize",
        "features",
        "patches",
        "cluster",
        "finetune",
        "embed",
        "embed_patches",
        "vlad",
        "pca",
        "esvm",
        "rerank",
        "retrieval",
        "report",
    )
}
# A pretraining run's code covers its own method's module only (editing jigsaw keeps AttMask runs).
PRETRAIN_CODE = {
    m: code_version("pretrain", workflow.basedir, pretrain_code_skip(m))
    for m in PRETRAIN_MODULES
}


wildcard_constraints:
    dataset="|".join(map(re.escape, config["datasets"])),
    folder=r"[A-Za-z0-9_.+-]+-[0-9a-f]{10}",
    shard=r"\d{4}",


localrules:
    all,
    segment,
    binarize,
    binarize_quality_summary,
    features,
    embed,
    embed_patches,
    patches,
    vlad,
    esvm,
    report,


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
include: "rules/embed_patches.smk"
include: "rules/vlad.smk"
include: "rules/pca.smk"
include: "rules/esvm.smk"
include: "rules/rerank.smk"
include: "rules/retrieval.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        [f"{RESULTS}/{d}/index.parquet" for d in DATASETS],
        [
            stage_path(v, "settings.json")
            for d in DATASETS
            for v in PLAN.variants("binarize", d)
        ],
        [
            f"{RESULTS}/{d}/binarize/quality_summary.parquet"
            for d in DATASETS
            if has_ground_truth(d)
        ],
        [
            stage_path(v, "settings.json")
            for d in DATASETS
            for v in PLAN.variants("segment", d)
        ],
        cluster_files("contact_sheet.png"),
        get_side_outputs,
        f"{RESULTS}/benchmark.parquet",
        f"{RESULTS}/report.html",
