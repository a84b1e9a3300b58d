"""The workflow through a real SLURM: profiles/slurm-ci on the one-node cluster of .ci/slurm.sh.

Runs in `make test` (CI is a root Debian machine; `.ci/slurm.sh up` installs the Debian SLURM
packages when they are missing). Skipped, with the reason, when not root, when SLURM is missing
and cannot be installed (no apt-get/dpkg), or with WR_SKIP_SLURM=1. About 5 minutes on 2 cores:
the local run ~1 min, the SLURM run ~3.5 min for 38 jobs (two Python start-ups per job, and the
plugin's status polling between dependent jobs).
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
SLURM_SH = REPO / ".ci" / "slurm.sh"
# A fixed workdir: `up` refuses while a cluster started from another workdir still runs, and
# `down` on this path stops one that an interrupted earlier run left behind.
CLUSTER = Path("/tmp/writer-retrieval-slurm-ci")
METRICS = ["map", "top1", "p_at_5", "p_at_10", "n_queries"]
ROW_KEY = ["dataset", "features", "aggregation", "rerank"]
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def skip_reason() -> str | None:
    if os.environ.get("WR_SKIP_SLURM") == "1":
        return "WR_SKIP_SLURM=1"
    if os.geteuid() != 0:
        return "needs root: .ci/slurm.sh starts munged, slurmctld and slurmd"
    binaries = ["sbatch", "squeue", "scontrol", "srun"]
    daemons = ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged"]
    installed = all(shutil.which(b) for b in binaries) and all(Path(d).exists() for d in daemons)
    if not installed and not (shutil.which("apt-get") and shutil.which("dpkg")):
        return "SLURM is not installed and cannot be installed here (no apt-get/dpkg)"
    return None


pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=f"SLURM test skipped: {skip_reason()}")


def config_with_a_gpu_rule(tmp_path: Path) -> Path:
    """workflow_tests/configs/tiny.yaml plus an untrained ViT (device auto): its embed_shard jobs request gpu=1,
    so the GPU routing runs on the cluster's fake GPU (and on the CPU, as no GPU is there)."""
    cfg = yaml.safe_load((REPO / "workflow_tests" / "configs" / "tiny.yaml").read_text())
    cfg["features"] = {
        "sift": {"kind": "sift"},
        "random-vit": {"kind": "vit", "pretrain": {"method": "none"}, "aggregations": ["sum"], "device": "auto",
                       "model": {"arch": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 16, "embed_dim": 32,
                                 "depth": 2, "num_heads": 2},
                       "embed": {"window": 64, "stride": 64, "batch_size": 16}},
    }
    (exp,) = cfg["experiments"]
    cfg["experiments"] = [{**exp, "features": ["sift"]},
                          {"dataset": exp["dataset"], "features": ["random-vit"], "rerank": ["none"]}]
    path = tmp_path / "tiny-slurm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cmd: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    # Always stop it again, also when `up` itself failed halfway.
    try:
        proc = run([str(SLURM_SH), "up", str(CLUSTER)], REPO, timeout=600)
        assert proc.returncode == 0, f".ci/slurm.sh up failed:\n{proc.stderr[-4000:]}"
        yield CLUSTER
    finally:
        down = run([str(SLURM_SH), "down", str(CLUSTER)], REPO, timeout=120)
        print(down.stderr[-2000:], file=sys.stderr)


def job_headers(output: str) -> list[tuple[str, str]]:
    """('rule'|'localrule'|'checkpoint'|'localcheckpoint', name) of every job Snakemake started."""
    return re.findall(r"^(localrule|rule|localcheckpoint|checkpoint) (\w+):$", output, flags=re.M)


def steps_done(output: str) -> int:
    return int(re.findall(r"^(\d+) of (\d+) steps \(100%\) done", output, flags=re.M)[-1][1])


def test_tiny_workflow_through_slurm_matches_a_local_run(cluster, tmp_path):
    config = config_with_a_gpu_rule(tmp_path)
    local, on_slurm = tmp_path / "local", tmp_path / "slurm"
    local.mkdir()
    on_slurm.mkdir()

    start = time.perf_counter()
    proc = run([str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(local), "--configfile", str(config),
                "--cores", "2"], local, timeout=900)
    local_seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    local_out = proc.stdout + proc.stderr

    # timeout -k: a snakemake that lost track of a job would wait forever and ignores SIGTERM.
    start = time.perf_counter()
    proc = run(["timeout", "-k", "10", "900", str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(on_slurm),
                "--configfile", str(config), "--profile", str(REPO / "profiles" / "slurm-ci")], on_slurm,
               timeout=960)
    slurm_seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"rc {proc.returncode}\n{out[-6000:]}"

    # Every job but the local rules (merges of shard tables, the report, `all`) went through sbatch,
    # each exactly once.
    headers = job_headers(out)
    local_jobs = [name for kind, name in headers if kind.startswith("local")]
    assert set(local_jobs) == {"all", "binarize", "binarize_quality_summary", "features", "embed", "vlad",
                               "report"}, local_jobs
    submitted = SUBMITTED.findall(out)
    assert len(submitted) == len(headers) - len(local_jobs) == steps_done(out) - len(local_jobs)
    assert len({slurm_id for _, slurm_id, _ in submitted}) == len(submitted)
    print(f"\nlocal run {local_seconds:.0f} s; SLURM run {slurm_seconds:.0f} s, {len(submitted)} SLURM jobs")
    assert steps_done(out) == steps_done(local_out)  # the same jobs as the local run
    # slurm-keep-successful-logs: one log per job, .snakemake/slurm_logs/rule_<rule>[/<wildcards>]/<jobid>.log
    logs = list((on_slurm / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert sorted(log.stem for log in logs) == sorted(slurm_id for _, slurm_id, _ in submitted)
    rules = {slurm_id: re.search(r"/slurm_logs/rule_(\w+?)/", log).group(1) for _, slurm_id, log in submitted}
    assert {"dataset", "binarize_shard", "features_shard", "embed_shard", "vlad_shard", "retrieval"} \
        <= set(rules.values())

    # GPU routing: an embed_shard job (gpu=1 -> sbatch --gpus=1) got the node's GPU, a CPU job did
    # not. Finished jobs stay visible to scontrol for MinJobAge (300 s): ask about the last ones.
    def job(slurm_id: str) -> str:
        show = run(["timeout", "5", "scontrol", "show", "job", "-d", slurm_id], REPO, timeout=10)
        assert show.returncode == 0, show.stderr
        return show.stdout

    embed_ids = [i for i, rule in rules.items() if rule == "embed_shard"]
    assert len(embed_ids) == 4
    assert re.search(r"TresPerJob=\S*gres:gpu:1", job(embed_ids[-1])), job(embed_ids[-1])
    scoring_id = [i for i, rule in rules.items() if rule == "retrieval"][-1]
    assert not re.search(r"TresPer(Job|Node|Socket|Task)=\S*gpu", job(scoring_id)), job(scoring_id)

    # The results are those of the local run (timings aside).
    def metrics(workdir: Path) -> pd.DataFrame:
        bench = pd.read_parquet(workdir / "results" / "benchmark.parquet")
        return bench[ROW_KEY + METRICS].sort_values(ROW_KEY).reset_index(drop=True)

    expected = metrics(local)
    assert len(expected) == 5 and set(expected.features) == {"sift", "random-vit"}
    pd.testing.assert_frame_equal(metrics(on_slurm), expected, check_exact=True)
