"""The re-run table of docs/reruns.md: what a dry run plans after one config change on a finished run.

    python bench/rerun_table.py [--workdir /tmp/rerun-table]

Runs the tiny test configs once (tiny, tiny-vit, tiny-ssl; a few minutes on 2 cores, reused when
already finished), then for each case of workflow_tests/rerun_cases.py a dry run with only that
change, and prints a Markdown table: the change, whether it is an execution or a result setting,
and the jobs planned per rule (workflow_tests/test_workflow.py asserts the same counts).
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_tests"))
from rerun_cases import CASES, job_counts  # noqa: E402

SNAKEMAKE = Path(sys.executable).with_name("snakemake")
# Rules in pipeline order, for the table.
ORDER = ["dataset", "segment_shard", "segment", "binarize_shard", "binarize", "binarize_quality_summary",
         "features_shard", "features", "patches_shard", "patches", "cluster", "pretrain", "finetune", "embed_shard",
         "embed", "embed_patches_shard", "embed_patches", "vlad_codebook", "vlad_shard", "vlad", "descriptors",
         "rerank", "retrieval", "report"]


def snakemake(workdir: Path, configfile: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
                           str(configfile), "--cores", "2", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rerun-table"))
    args = parser.parse_args()
    print("| change | kind | jobs planned |\n|---|---|---|")
    for case in CASES:
        workdir = args.workdir / case.config
        workdir.mkdir(parents=True, exist_ok=True)
        snakemake(workdir, REPO / "workflow_tests" / "configs" / f"{case.config}.yaml")  # nothing to do once finished
        cfg = yaml.safe_load((REPO / "workflow_tests" / "configs" / f"{case.config}.yaml").read_text())
        case.edit(cfg)
        changed = workdir / "changed.yaml"
        changed.write_text(yaml.safe_dump(cfg))
        jobs = job_counts(snakemake(workdir, changed, "-n"))
        if jobs != case.jobs:
            print(f"(expected {case.jobs})", file=sys.stderr)
        planned = ", ".join(f"{rule} {jobs[rule]}" for rule in ORDER if rule in jobs) or "0 (nothing to do)"
        print(f"| `{case.config}`: {case.change} | {case.kind} | {planned} |", flush=True)


if __name__ == "__main__":
    main()
