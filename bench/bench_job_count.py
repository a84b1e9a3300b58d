"""How many jobs (= SLURM jobs on a cluster) a large collection becomes: a dry run on N documents.

    python bench/bench_job_count.py [--documents 100000] [--shard-size 1024] [--workdir /tmp/jobcount]

Writes N small page images (a pen stroke each, 50 writers' worth of names) into a folder dataset,
runs the dataset stage for real (the index decides the number of shards), then a Snakemake dry
run of the whole grid (SIFT, AttMask ViT, SAGHOG with fine-tuning; three rerankers) and prints the
job count per rule and in total, next to the per-document count the shards avoid.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def write_pages(root: Path, n: int, writers: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"{i % writers:04d}_{i // writers:05d}.png"
        if path.exists():
            continue
        page = np.full((64, 64), 255, np.uint8)
        x0, y0 = rng.integers(5, 30, size=2)
        cv2.line(page, (int(x0), int(y0)), (int(x0) + 25, int(y0) + 20), 0, 3)
        page[-1, :20] = [0 if i >> bit & 1 else 255 for bit in range(20)]  # distinct bytes: no duplicate pages
        cv2.imwrite(str(path), page)


def config(root: Path, shard_size: int) -> dict:
    vit = {"arch": "vit_small_patch16_224", "img_size": 224, "patch_size": 16}
    return {
        "datasets": {"large": {"adapter": "folder", "root": str(root),
                               "pattern": r"(?P<writer>\d+)_(?P<page>\d+)\.png", "empty_page_ink": 0.0}},
        "shard_size": shard_size,
        "features": {"sift": {"kind": "sift"},
                     "attmask-vit": {"kind": "vit", "model": vit, "pretrain": {"method": "attmask"}},
                     "saghog-ft": {"kind": "saghog", "finetune": {"method": "netrvlad"}}},
        "experiments": [{"dataset": "large", "rerank": ["none", "krnn", "sgr", "gnn"]}],
    }


def snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
                           str(configfile), "--cores", "2", *args], capture_output=True, text=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--writers", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jobcount"))
    args = parser.parse_args()

    start = time.perf_counter()
    root = args.workdir / "pages"
    write_pages(root, args.documents, args.writers)
    print(f"{args.documents} page images in {root} ({time.perf_counter() - start:.0f} s)")
    cfg = args.workdir / "config.yaml"
    cfg.write_text(yaml.safe_dump(config(root, args.shard_size)))
    start = time.perf_counter()
    proc = snakemake(args.workdir, cfg, "results/large/index.parquet")
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    print(f"dataset stage (index of {args.documents} documents): {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    proc = snakemake(args.workdir, cfg, "-n", "--quiet", "rules")
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    print(f"dry run: {time.perf_counter() - start:.0f} s\n")
    table = proc.stdout[proc.stdout.index("Job stats:"):]
    print(table[:table.index("total")].rstrip() + "\n" + table[table.index("total"):].split("\n")[0])
    shards = -(-args.documents // args.shard_size)
    print(f"\nshard_size {args.shard_size}: {shards} shards; per-document rules run once per shard, "
          f"not once per document ({args.documents} documents)")


if __name__ == "__main__":
    main()
