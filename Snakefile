# writer-retrieval: reproducible writer-retrieval benchmarks (see README.md).
# Stages live in rules/<stage>.smk, glue in scripts/<stage>.py, logic in src/writer_retrieval/<stage>.py.
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from writer_retrieval.config import ConfigError, binarize_variants, validate_config

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
BINARIZE = {name: binarize_variants(config, name) for name in config["datasets"]}
RESULTS = "results"


wildcard_constraints:
    dataset="|".join(map(re.escape, config["datasets"])),
    variant=r"[a-z0-9+]+-[0-9a-f]{10}",
    shard=r"\d{4}",


include: "rules/dataset.smk"
include: "rules/binarize.smk"


def has_ground_truth(dataset):
    return config["datasets"][dataset]["adapter"] == "synthetic"


rule all:
    default_target: True
    input:
        [f"{RESULTS}/{d}/index.parquet" for d in DATASETS],
        [f"{RESULTS}/{d}/binarize/{v}/stats.parquet" for d in DATASETS for v in BINARIZE[d]],
        [f"{RESULTS}/{d}/binarize/quality_summary.parquet" for d in DATASETS if has_ground_truth(d)],
