"""End-to-end Snakemake runs (CLI) of the workflow on tiny generated data."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from writer_retrieval.imaging import read_mask

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(configfile),
         "--cores", "2", *args],
        capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    proc = snakemake(workdir, REPO / "configs" / "tiny.yaml")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def test_tiny_run_leaves_index_masks_and_quality(tiny_run):
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["datasets"]["tiny"]
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
        # 12 pages in shards of 5 -> 3 shard jobs
        assert len(list((tiny_run / f"results/tiny/binarize/{v}/shards").glob("*.parquet"))) == 3
    summary = pd.read_parquet(tiny_run / "results/tiny/binarize/quality_summary.parquet")
    assert sorted(summary.method) == ["otsu", "sauvola"] and (summary.n_pages == len(index)).all()
    assert (summary.f_measure > 0.6).all() and (summary.psnr > 10).all()


def test_second_run_has_nothing_to_do(tiny_run):
    proc = snakemake(tiny_run, REPO / "configs" / "tiny.yaml", "-n")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    counts, inside = {}, False
    for line in output.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            inside = True
        elif inside and len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
        elif inside and parts and parts[0] == "total":
            break
    return counts


def test_changing_a_binarizer_setting_reruns_only_that_binarizer(tiny_run, tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["preprocess"]["window"] = 41
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tiny_run, changed, "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The dataset is untouched and Otsu (no window) is reused; only a new Sauvola variant is made.
    assert job_counts(proc.stdout + proc.stderr) == {"binarize_shard": 3, "binarize": 1,
                                                     "binarize_quality_summary": 1, "all": 1}


def test_bad_config_key_stops_before_any_job(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["preprocess"]["windw"] = 41
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, bad)
    assert proc.returncode != 0
    assert "unknown key 'preprocess.windw' (did you mean 'window'?)" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_truncated_jpeg_in_a_dataset_folder_stops_with_its_name(tmp_path):
    root = tmp_path / "pages"
    root.mkdir()
    import numpy as np

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
