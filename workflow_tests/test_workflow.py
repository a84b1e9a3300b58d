"""End-to-end Snakemake runs (CLI) of the workflow on tiny generated data."""
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from writer_retrieval.imaging import read_mask

from rerun_cases import CASES, job_counts
from studies import STUDIES, study_config

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
CONFIGS = REPO / "workflow_tests" / "configs"  # test configs, not user presets


def snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    # Every job records which of its settings its code reads (writer_retrieval.jobs, checked below).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "WR_RECORD_SETTINGS": str(workdir / "settings-reads")}
    return subprocess.run(
        [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(configfile),
         "--cores", "2", *args],
        capture_output=True, text=True, env=env, timeout=900)


def finished_run(tmp_path_factory, config: str) -> Path:
    workdir = tmp_path_factory.mktemp(config)
    proc = snakemake(workdir, CONFIGS / f"{config}.yaml")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def test_tiny_run_leaves_index_masks_and_quality(tiny_run):
    cfg = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())["datasets"]["tiny"]
    index = pd.read_parquet(tiny_run / "results/tiny/index.parquet")
    assert len(index) == cfg["writers"] * cfg["pages_per_writer"]
    assert index.writer.nunique() == cfg["writers"]
    assert index.loc[index.split == "train", "writer"].nunique() == cfg["train_writers"]
    assert pd.read_parquet(tiny_run / "results/tiny/rejected.parquet").empty
    variants = sorted(p.name for p in (tiny_run / "results/tiny/binarize").iterdir() if p.is_dir())
    assert [v.split("-")[0] for v in variants] == ["otsu", "sauvola"]
    for v in variants:
        stats = pd.read_parquet(tiny_run / f"results/tiny/binarize/{v}/stats.parquet")
        assert sorted(stats.doc_id) == sorted(index.doc_id)
        mask = read_mask(tiny_run / stats.mask_path.iloc[0])
        row = index.set_index("doc_id").loc[stats.doc_id.iloc[0]]
        assert mask.shape == (row.height, row.width)
        assert (tiny_run / f"results/tiny/binarize/{v}/settings.json").exists()
        # 30 pages in shards of 8 -> 4 shard jobs
        assert len(list((tiny_run / f"results/tiny/binarize/{v}/shards").glob("*.parquet"))) == 4
    summary = pd.read_parquet(tiny_run / "results/tiny/binarize/quality_summary.parquet")
    assert sorted(summary.method) == ["otsu", "sauvola"] and (summary.n_pages == len(index)).all()
    assert (summary.f_measure > 0.6).all() and (summary.psnr > 10).all()


def test_second_run_has_nothing_to_do(tiny_run):
    proc = snakemake(tiny_run, CONFIGS / "tiny.yaml", "-n")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


def dry_run_jobs(workdir, tmp_path, change, config: str = "tiny") -> dict[str, int]:
    """The jobs a dry run plans on a finished run of workflow_tests/configs/<config>.yaml after `change`."""
    cfg = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    change(cfg)
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    proc = snakemake(workdir, changed, "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return job_counts(proc.stdout + proc.stderr)


DOWNSTREAM_OF_FEATURES = {"vlad_codebook": 1, "vlad_shard": 4, "vlad": 1, "descriptors": 1, "rerank": 3,
                          "retrieval": 4, "report": 1, "all": 1}


def test_changing_a_binarizer_setting_reruns_that_binarizer_and_what_follows(tiny_run, tmp_path):
    jobs = dry_run_jobs(tiny_run, tmp_path, lambda c: c["preprocess"].update(window=41))
    # The dataset is untouched and Otsu (no window) is reused; the new Sauvola variant feeds SIFT.
    assert jobs == {"binarize_shard": 4, "binarize": 1, "binarize_quality_summary": 1, "features_shard": 4,
                    "features": 1, **DOWNSTREAM_OF_FEATURES}


def test_changing_a_rerankers_parameter_reruns_only_reranking_and_scoring(tiny_run, tmp_path):
    rerankers = {"krnn": {"method": "krnn"}, "sgr": {"method": "sgr", "gamma": 0.7}, "gnn": {"method": "gnn"}}
    jobs = dry_run_jobs(tiny_run, tmp_path, lambda c: c.update(rerank=rerankers))
    assert jobs == {"rerank": 1, "retrieval": 1, "report": 1, "all": 1}


def test_adding_an_experiment_runs_only_its_new_jobs(tiny_run, tmp_path):
    def add(cfg):  # a second grid entry: exclude_same page (a new experiment on the same descriptors)
        cfg["experiments"].append({"dataset": "tiny", "rerank": ["none", "krnn"], "exclude_same": "page"})

    jobs = dry_run_jobs(tiny_run, tmp_path, add)
    # kRNN twice: on all test documents, and with same-page documents out of the graph
    assert jobs == {"rerank": 1, "retrieval": 3, "report": 1, "all": 1}


def workflow_copy(tmp_path) -> Path:
    """A copy of the workflow's code (Snakefile, rules, scripts, src), to edit without touching the repo."""
    import shutil

    copy = tmp_path / "workflow"
    copy.mkdir()
    for part in ("Snakefile", "rules", "scripts", "src", "configs", "config.yaml"):
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, copy / part)
    return copy


def copy_dry_run(copy: Path, workdir: Path) -> dict[str, int]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([str(SNAKEMAKE), "-s", str(copy / "Snakefile"), "-d", str(workdir), "--configfile",
                           str(CONFIGS / "tiny.yaml"), "--cores", "2", "-n"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return job_counts(proc.stdout + proc.stderr)


def test_editing_a_library_module_reruns_its_stage_and_what_follows(tiny_run, tmp_path):
    copy = workflow_copy(tmp_path)
    # An unchanged copy of the code is the same code version: nothing to do.
    assert copy_dry_run(copy, tiny_run) == {}
    # Comments and formatting are not code: still nothing to do.
    pca = copy / "src" / "writer_retrieval" / "pca.py"
    original = pca.read_text()
    pca.write_text(original + "\n# a comment only\n")
    assert copy_dry_run(copy, tiny_run) == {}
    # A real edit of the whitening module re-runs whitening and what follows, nothing upstream.
    pca.write_text(pca.read_text() + "\nPCA_EDITED = True\n")
    assert copy_dry_run(copy, tiny_run) == {"descriptors": 1, "rerank": 3, "retrieval": 4, "report": 1, "all": 1}
    pca.write_text(original)
    # The reranking module: reranking and the scoring of reranked rows (their code version covers it).
    rerank = copy / "src" / "writer_retrieval" / "rerank.py"
    original = rerank.read_text()
    rerank.write_text(original + "\nRERANK_EDITED = True\n")
    assert copy_dry_run(copy, tiny_run) == {"rerank": 3, "retrieval": 3, "report": 1, "all": 1}
    rerank.write_text(original)
    # The plan and the job plumbing route settings and never change what a stage computes.
    for plumbing in ("plan.py", "jobs.py", "provenance.py"):
        module = copy / "src" / "writer_retrieval" / plumbing
        module.write_text(module.read_text() + "\nPLUMBING_EDITED = True\n")
    assert copy_dry_run(copy, tiny_run) == {}
    # A module shared by many stages (imaging: page and mask I/O) re-runs from the first stage importing it.
    imaging = copy / "src" / "writer_retrieval" / "imaging.py"
    imaging.write_text(imaging.read_text() + "\nIMAGING_EDITED = True\n")
    jobs = copy_dry_run(copy, tiny_run)
    assert {"dataset", "report"} <= set(jobs)


def test_a_second_run_from_scratch_gives_identical_metrics(tiny_run, tmp_path):
    proc = snakemake(tmp_path, CONFIGS / "tiny.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    columns = ["features", "aggregation", "rerank", "map", "top1", "p_at_5", "p_at_10", "n_queries",
               "median_first_hit_rank", "settings_hash", "code_version"]
    first = pd.read_parquet(tiny_run / "results" / "benchmark.parquet")[columns]
    second = pd.read_parquet(tmp_path / "results" / "benchmark.parquet")[columns]
    pd.testing.assert_frame_equal(first, second)  # bit-identical floats, same order


def test_metrics_rows_carry_settings_hash_and_code_version(tiny_run):
    bench = pd.read_parquet(tiny_run / "results" / "benchmark.parquet")
    assert bench.settings_hash.str.fullmatch(r"[0-9a-f]{10}").all()
    assert bench.code_version.str.fullmatch(r"[0-9a-f]{10}").all()
    # Reranked rows include the reranking stage's code, so their version differs from the plain row's.
    assert bench.groupby(bench.rerank == "none").code_version.nunique().tolist() == [1, 1]
    assert bench.code_version.nunique() == 2


def test_benchmark_outputs_and_schemas(tiny_run):
    import pyarrow as pa
    import pyarrow.parquet as pq

    res = tiny_run / "results"
    (desc_path,) = res.glob("tiny/descriptors/sift-vlad-*/descriptors.parquet")
    schema = pq.read_schema(desc_path)
    assert schema.names == ["doc_id", "writer", "split", "descriptor"]
    assert pa.types.is_fixed_size_list(schema.field("descriptor").type)
    assert schema.field("descriptor").type.value_type == pa.float32()
    desc = pd.read_parquet(desc_path)
    assert len(desc) == 30 and set(desc.split) == {"train", "test"}
    vectors = np.stack(desc.descriptor.to_numpy())
    # 12 train pages: PCA models at most 11 components; shrinkage whitening keeps the 32 x 128 VLAD
    # dimensions (the rest of the space at the target scale); rows are L2-normalised.
    pca = json.loads((desc_path.parent / "pca.json").read_text())
    assert pca["pca"] == "shrink" and pca["pca_dims"] <= 11
    assert vectors.shape[1] == 32 * 128 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)

    (exp,) = res.glob("tiny/experiments/sift-vlad-none-*")
    rankings = pd.read_parquet(exp / "rankings.parquet")
    assert list(rankings.columns) == ["query_doc_id", "rank", "doc_id", "score", "relevant"]
    assert rankings.query_doc_id.nunique() == 18 and (rankings.groupby("query_doc_id").size() == 17).all()
    metrics = pd.read_parquet(exp / "metrics.parquet")
    for col in ["dataset", "features", "aggregation", "rerank", "n_docs", "n_queries", "n_skipped_queries", "map",
                "top1", "p_at_5", "p_at_10", "settings_hash", "seconds", "pca_fit_on"]:
        assert col in metrics.columns
    row = metrics.iloc[0]
    assert (row.dataset, row.features, row.aggregation, row.rerank, row.pca_fit_on) == ("tiny", "sift", "vlad", "none", "train")
    assert row.n_docs == 18 and row.n_queries == 18 and row.n_skipped_queries == 0
    # 6 test writers x 3 pages: a random ranking scores about 0.25 mAP.
    assert 0.2 < row.chance_map < 0.3 and row["map"] > row.chance_map + 0.3
    bench = pd.read_parquet(res / "benchmark.parquet")
    assert sorted(bench.rerank) == ["gnn", "krnn", "none", "sgr"]
    assert bench.loc[bench.rerank == "none", "map"].item() == row["map"]
    assert (bench["map"] > bench.chance_map + 0.3).all()
    html_text = (res / "report.html").read_text()
    assert "<table" in html_text and "data:image/png;base64" in html_text and "example queries" in html_text
    assert html_text.count("data:image/jpeg;base64") == 3 * 6  # 3 queries x (query + top 5)


def test_bad_config_key_stops_before_any_job(tmp_path):
    cfg = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    cfg["preprocess"]["windw"] = 41
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, bad)
    assert proc.returncode != 0
    assert "unknown key 'preprocess.windw' (did you mean 'window'?)" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_a_preset_without_its_dataset_root_stops_before_any_job_naming_the_key(tmp_path):
    proc = snakemake(tmp_path, REPO / "configs" / "ahawp.yaml")
    assert proc.returncode != 0
    assert "'datasets.ahawp.root' is required" in proc.stderr
    assert "--config 'datasets={ahawp: {root: /data/ahawp}}'" in proc.stderr
    missing = str(tmp_path / "nowhere")
    proc = snakemake(tmp_path, REPO / "configs" / "ahawp.yaml", "--config", f"datasets={{ahawp: {{root: {missing}}}}}")
    assert proc.returncode != 0
    assert f"'datasets.ahawp.root' = '{missing}': no such folder" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_truncated_jpeg_in_a_dataset_folder_stops_with_its_name(tmp_path):
    root = tmp_path / "pages"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ["1-IMG_MAX_1.jpg", "1-IMG_MAX_2.jpg", "2-IMG_MAX_3.jpg", "2-IMG_MAX_4.jpg"]:
        page = np.full((64, 64), 230, np.uint8)
        page[rng.integers(0, 64, 200), rng.integers(0, 64, 200)] = 10
        Image.fromarray(page).save(root / name)
    blob = (root / "2-IMG_MAX_4.jpg").read_bytes()
    (root / "2-IMG_MAX_4.jpg").write_bytes(blob[: len(blob) // 2])
    cfg = {"datasets": {"mine": {"adapter": "icdar2017", "root": str(root)}}, "experiments": [{"dataset": "mine"}]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, path)
    assert proc.returncode != 0
    assert "2-IMG_MAX_4.jpg: truncated" in proc.stderr
    assert not (tmp_path / "results/mine/index.parquet").exists()


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    return finished_run(tmp_path_factory, "tiny-vit")


@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory):
    return finished_run(tmp_path_factory, "tiny-ssl")


def test_vit_features_pretrain_embed_and_aggregate(vit_run):
    res = vit_run / "results"
    bench = pd.read_parquet(res / "benchmark.parquet")
    rows = set(zip(bench.features, bench.aggregation))
    assert rows == {("random-vit", "vlad"), ("random-vit", "sum"), ("attmask-vit", "vlad"), ("attmask-vit", "sum"),
                    ("attmask-vit-l2", "vlad")}
    assert (bench.n_queries == 18).all() and bench["map"].notna().all()
    # One pretraining run serves both AttMask extractors (they differ only in how they embed).
    (run,) = res.glob("tiny/pretrain/attmask-*")
    log = pd.read_parquet(run / "log.parquet")
    assert list(log.epoch) == [1, 2] and np.isfinite(log.loss).all()
    assert (run / "backbone.pt").exists() and (run / "checkpoint.pt").exists()
    # Foreground tokens stored as float16 with their index; the 2-layer mean keeps the width.
    (shard_index,) = res.glob("tiny/features/attmask-vit-[0-9a-f]*/shards/0000.parquet")
    index = pd.read_parquet(shard_index)
    assert list(index.columns[:4]) == ["doc_id", "n_tokens", "shard", "offset"] and (index.n_tokens > 0).all()
    tokens = np.load(shard_index.with_name("0000.tokens.npy"))
    assert tokens.dtype == np.float16 and tokens.shape == (index.n_tokens.sum(), 32)
    (l2,) = res.glob("tiny/features/attmask-vit-l2-*/shards/0000.tokens.npy")
    assert np.load(l2).shape[1] == 32
    assert "Pretraining" in (res / "report.html").read_text()


def test_sam_without_checkpoint_stops_before_any_job(tmp_path):
    cfg = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    cfg["preprocess"] = {"method": "sam"}
    path = tmp_path / "sam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, path)
    assert proc.returncode != 0
    assert "preprocess.sam.checkpoint" in proc.stderr and "mobile_sam.pt" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_sam_preprocessing_with_random_weights_end_to_end(tmp_path):
    proc = snakemake(tmp_path, CONFIGS / "tiny-sam.yaml")
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = tmp_path / "results" / "tiny"
    (segments,) = res.glob("segment/sam-*/segments.parquet")
    table = pd.read_parquet(segments)
    assert len(table) == 30 and table.reason.str.len().gt(0).all()
    assert table.region_area_ratio.between(0, 1).all() and table.kept.dtype == bool
    assert len(list(segments.parent.glob("regions/*/*.png"))) == 30
    assert len(list(segments.parent.glob("pages/*/*.png"))) == 30
    summary = pd.read_parquet(res / "binarize" / "quality_summary.parquet")
    assert sorted(summary.method) == ["sam+sauvola", "sauvola"]
    # Ink of sam+sauvola lies inside the SAM region.
    (stats,) = res.glob("binarize/sam+sauvola-*/stats.parquet")
    first = pd.read_parquet(stats).iloc[0]
    (region_path,) = segments.parent.glob(f"regions/*/{first.doc_id}.png")
    region = read_mask(region_path)
    assert not (read_mask(tmp_path / first.mask_path) & ~region).any()
    assert (tmp_path / "results" / "benchmark.parquet").exists()


def test_saghog_and_pretext_features_end_to_end(ssl_run):
    res = ssl_run / "results" / "tiny"
    bench = pd.read_parquet(ssl_run / "results" / "benchmark.parquet")
    assert set(zip(bench.features, bench.aggregation)) == {("flip-vit", "vlad"), ("sorting-vit", "vlad"),
                                                          ("saghog", "sum"), ("saghog-ft", "sum")}
    assert (bench.n_queries == 18).all() and bench["map"].notna().all()
    # One patch extraction, one clustering and one masked-HOG run serve both SAGHOG extractors.
    (patches,) = res.glob("patches/patches-*")
    (cluster,) = res.glob("cluster/cluster-*")
    assert len(list(res.glob("pretrain/saghog-*/backbone.pt"))) == 1
    assert len(list(res.glob("finetune/netrvlad-*/model.pt"))) == 1
    labels = pd.read_parquet(cluster / "patches.parquet")
    shard0 = pd.read_parquet(patches / "shards" / "0000.parquet")
    assert len(shard0) == np.load(patches / "shards" / "0000.patches.npy", mmap_mode="r").shape[0]
    assert list(labels.columns[:7]) == ["doc_id", "x", "y", "split", "shard", "row", "cluster"]
    assert labels.cluster.max() < 20 and (labels.cluster >= -1).all()
    # SAGHOG page descriptors: one unit-norm row per page of the shard.
    (pooled,) = res.glob("features/saghog-" + "[0-9a-f]" * 10 + "/shards/0000.pooled.npy")
    vectors = np.load(pooled)
    assert vectors.shape == (30, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    (tuned,) = res.glob("features/saghog-ft-*/shards/0000.pooled.npy")
    assert np.load(tuned).shape == (30, 8 * 32)
    for method in ("flip", "sorting"):
        (log,) = res.glob(f"pretrain/{method}-*/log.parquet")
        assert list(pd.read_parquet(log).columns[:3]) == ["epoch", "loss", "accuracy"]
    html = (ssl_run / "results" / "report.html").read_text()
    assert "patch clusters" in html and "Training health" in html and html.count("data:image/png") >= 3


# --------------------------------------------------------------------------------------------
# The shipped studies (sweeps, transfer) and the measurement rows (E-SVM, CIs, paired comparisons)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("studies")
    path = workdir / "studies.yaml"
    path.write_text(yaml.safe_dump(study_config(workdir)))
    proc = snakemake(workdir, path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def test_study_sweeps_train_once_per_pretraining_setting(study_run):
    bench = pd.read_parquet(study_run / "results" / "benchmark.parquet")
    tfg = bench[bench.features.str.startswith("tfg-attmask-vit.t_fg-")]
    assert sorted(tfg.sweep) == [f"embed.t_fg={v}" for v in (0, 10, 20, 5, 50)]
    assert (tfg.extractor == "tfg-attmask-vit").all()
    masking = bench[bench.features.str.startswith("mask-attmask-vit.masking-")]
    assert sorted(set(masking.features.str.rsplit("masking-", n=1).str[-1])) == ["attmask_high", "block", "random"]
    # One AttMask run per masking; the t_fg sweep and the transfer study reuse the attmask_high one.
    runs = [json.loads(p.read_text())["result"] for p in study_run.glob("results/tiny/pretrain/attmask-*/settings.json")]
    assert sorted(r["masking"] for r in runs) == ["attmask_high", "block", "random"]


def test_study_transfer_rows_fit_on_synthetic_and_retrieve_on_ahawp(study_run):
    bench = pd.read_parquet(study_run / "results" / "benchmark.parquet")
    ahawp = bench[bench.dataset == "ahawp"]
    assert set(ahawp.train_on) == {"tiny", "ahawp"}
    moved, own = (ahawp[ahawp.train_on == t].set_index(["features", "aggregation"]) for t in ("tiny", "ahawp"))
    assert sorted(moved.index) == sorted(own.index) and len(moved) >= 3
    assert (moved.n_queries == own.n_queries).all()
    # The transfer rows' AHAWP embedding uses the network trained on the synthetic set; the own rows' not.
    records = [json.loads(p.read_text()) for p in study_run.glob("results/ahawp/features/xfer-attmask-vit-*/settings.json")]
    assert sorted(r["sources"].get("pretrain", "ahawp") for r in records) == ["ahawp", "tiny"]
    moved_vlad = [json.loads(p.read_text()) for p in study_run.glob("results/ahawp/vlad/*/settings.json")]
    assert {"codebook": "tiny", "features": "ahawp"} in [{**{"features": "ahawp"}, **r["sources"]} for r in moved_vlad]


def test_study_rows_carry_confidence_intervals_and_paired_comparisons(study_run):
    bench = pd.read_parquet(study_run / "results" / "benchmark.parquet")
    assert ((bench.map_ci_low <= bench["map"]) & (bench["map"] <= bench.map_ci_high)).all()
    assert ((bench.top1_ci_low <= bench.top1) & (bench.top1 <= bench.top1_ci_high)).all()
    compared = bench[bench.baseline != ""]
    assert set(compared.baseline) == {"sift/vlad/none/none"} and len(compared) == len(bench)
    base = compared[(compared.features == "sift") & (compared.rerank == "none") & (compared.encoding == "none")]
    assert (base.delta_map == 0).all() and (base.share_improved == 0).all()
    # Hand check of one paired comparison from the two rows' per-query tables.
    def queries(name):
        for folder in study_run.glob(f"results/tiny/experiments/{name}-*"):
            if pd.read_parquet(folder / "metrics.parquet").exclude_same.iloc[0] == "none":
                return pd.read_parquet(folder / "queries.parquet").set_index("query_doc_id")

    row = compared.set_index("features").loc["tfg-attmask-vit.t_fg-10"]
    delta = queries("tfg-attmask-vit.t_fg-10-vlad-none").ap - queries("sift-vlad-none").ap
    assert row.delta_map == pytest.approx(delta.mean(), abs=1e-12)
    assert row.share_improved == pytest.approx((delta > 1e-12).mean())
    assert row.delta_map_ci_low <= row.delta_map <= row.delta_map_ci_high


def test_study_esvm_and_rerank_graph_rows(study_run):
    bench = pd.read_parquet(study_run / "results" / "benchmark.parquet")
    page = bench[(bench.dataset == "tiny") & (bench.exclude_same == "page")]
    assert sorted(page.encoding.unique()) == ["esvm", "none"]
    reranked = page[page.rerank != "none"]
    assert sorted(reranked.rerank_graph.unique()) == ["all", "other_pages"] and len(reranked) == 4
    (esvm,) = study_run.glob("results/tiny/esvm/sift-vlad-*/descriptors.parquet")
    table = pd.read_parquet(esvm)
    assert set(table.split) == {"test"} and len(table) == 18
    assert np.allclose(np.linalg.norm(np.stack(table.descriptor.to_numpy()), axis=1), 1, atol=1e-5)
    queries = pd.read_parquet(next(study_run.glob("results/tiny/experiments/sift-vlad-esvm-none-*/queries.parquet")))
    assert list(queries.columns[:6]) == ["query_doc_id", "writer", "ap", "first_hit_rank", "n_relevant",
                                         "gallery_size"]
    assert len(queries) == 18 and queries.ap.between(0, 1).all()
    html = (study_run / "results" / "report.html").read_text()
    assert "rerank graph" in html


# --------------------------------------------------------------------------------------------
# Re-runs a cluster user can trust: execution knobs plan nothing, result settings their stage on
# --------------------------------------------------------------------------------------------

RUNS = {"tiny": "tiny_run", "tiny-vit": "vit_run", "tiny-ssl": "ssl_run", "studies": "study_run"}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}: {c.change}" for c in CASES])
def test_a_config_change_plans_exactly_its_stages(case, request, tmp_path):
    workdir = request.getfixturevalue(RUNS[case.config])
    assert dry_run_jobs(workdir, tmp_path, case.edit, case.config) == case.jobs


def read_records(workdir: Path) -> dict[tuple[str, str], dict]:
    """Per stage folder: its hashed and execution keys, and the keys its jobs' code read."""
    merged = {}
    for path in (workdir / "settings-reads").glob("*.json"):
        rec = json.loads(path.read_text())
        entry = merged.setdefault((rec["stage"], rec["folder"]), {**rec, "read": set()})
        entry["read"] |= set(rec["read_result"]) | set(rec["read_execution"])
    return merged


def covered(key: str, read: set[str]) -> bool:
    """A key counts as read when it or a block holding it was handed to the code."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in read for i in range(1, len(parts) + 1))


@pytest.mark.parametrize("run", sorted(RUNS.values()))
def test_stage_code_reads_every_hashed_and_execution_setting(run, request):
    """A hashed setting that no code reads re-runs work for nothing; an execution setting that no code
    reads is a knob that does nothing. Reads outside the variant's settings cannot happen: the jobs
    get nothing else (writer_retrieval.jobs.stage_job)."""
    records = read_records(request.getfixturevalue(run))
    stages = {stage for stage, _ in records}
    assert {"binarize", "descriptors", "experiment"} <= stages
    unread = {f"{stage} {folder}": sorted(k for k in rec["hashed"] + rec["execution"] if not covered(k, rec["read"]))
              for (stage, folder), rec in records.items()}
    assert {k: v for k, v in unread.items() if v} == {}


def test_stage_folders_record_settings_and_the_facts_of_the_run(tiny_run):
    res = tiny_run / "results" / "tiny"
    (features,) = res.glob("features/sift-*/settings.json")
    record = json.loads(features.read_text())
    assert record["stage"] == "features" and record["folder"] == features.parent.name
    assert record["result"]["contrast_threshold"] == 0.04 and record["inputs"]["binarize"].startswith("sauvola-")
    run = record["run"]
    assert run["jobs"] == 4 and run["seconds"] > 0 and run["device"] == "cpu" and run["threads"] >= 1
    assert {"torch", "timm", "faiss-cpu", "numpy"} <= set(run["versions"]) and run["versions"]["numpy"]
    (vlad,) = res.glob("vlad/sift-*/settings.json")
    assert json.loads(vlad.read_text())["execution"] == {"chunk_size": 65536}
    bench = pd.read_parquet(tiny_run / "results" / "benchmark.parquet")
    assert (bench.device == "cpu").all()
    for stage in ("binarize", "features", "codebook", "vlad", "descriptors"):
        assert (bench[f"seconds_{stage}"] > 0).all(), stage
    assert bench.seconds_pretrain.isna().all()  # SIFT's path has no pretraining
    assert bench.loc[bench.rerank == "none", "seconds_rerank"].isna().all()
    assert (bench.loc[bench.rerank != "none", "seconds_rerank"] > 0).all()


def test_a_deleted_output_reruns_its_stage(tiny_run, vit_run, tmp_path):
    (masks,) = (tiny_run / "results/tiny/binarize").glob("otsu-*/masks/0001")
    aside = tmp_path / "masks-0001"
    masks.rename(aside)
    try:
        jobs = dry_run_jobs(tiny_run, tmp_path, lambda cfg: None)
    finally:
        aside.rename(masks)
    assert jobs == {"binarize_shard": 1, "binarize": 1, "binarize_quality_summary": 1, "report": 1, "all": 1}
    (checkpoint,) = (vit_run / "results/tiny/pretrain").glob("attmask-*/checkpoint.pt")
    checkpoint.rename(tmp_path / "checkpoint.pt")
    try:
        jobs = dry_run_jobs(vit_run, tmp_path, lambda cfg: None, "tiny-vit")
    finally:
        (tmp_path / "checkpoint.pt").rename(checkpoint)
    assert jobs["pretrain"] == 1 and jobs["embed_shard"] == 2


def write_pages(root: Path, names: list[str]) -> None:
    for name in names:
        page = np.full((64, 64), 230, np.uint8)
        rng = np.random.default_rng(zlib.crc32(name.encode()))  # distinct pages (duplicates are rejected)
        page[rng.integers(0, 64, 200), rng.integers(0, 64, 200)] = 10
        Image.fromarray(page).save(root / name)


def dry_output(workdir: Path, config: Path, target: str) -> str:
    proc = snakemake(workdir, config, target, "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_the_dataset_index_follows_its_files(tmp_path):
    root = tmp_path / "pages"
    root.mkdir()
    write_pages(root, [f"{w}-IMG_MAX_{i}.png" for w in (1, 2) for i in (w * 10, w * 10 + 1)])
    cfg = {"datasets": {"mine": {"adapter": "icdar2017", "root": str(root)}}, "experiments": [{"dataset": "mine"}]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    target = "results/mine/index.parquet"
    assert snakemake(tmp_path, path, target).returncode == 0
    assert "Nothing to be done" in dry_output(tmp_path, path, target)
    write_pages(root, ["3-IMG_MAX_30.png"])  # a page added under root
    assert job_counts(dry_output(tmp_path, path, target)) == {"dataset": 1}
    assert snakemake(tmp_path, path, target).returncode == 0
    assert len(pd.read_parquet(tmp_path / target)) == 5
    (root / "notes.txt").write_text("not a page")  # an ignored file changes nothing
    assert "Nothing to be done" in dry_output(tmp_path, path, target)
    (root / "3-IMG_MAX_30.png").unlink()  # and a page removed
    assert job_counts(dry_output(tmp_path, path, target)) == {"dataset": 1}


def test_workflow_passes_snakemake_lint_and_snakefmt(tmp_path):
    proc = snakemake(tmp_path, CONFIGS / "tiny.yaml", "--lint")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    snakefmt = Path(sys.executable).with_name("snakefmt")
    proc = subprocess.run([str(snakefmt), "--check", "--diff", "Snakefile", "rules"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
