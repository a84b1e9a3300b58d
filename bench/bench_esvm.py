"""Exemplar SVMs at scale: SVMs per second and peak memory of the E-SVM stage.

    python bench/bench_esvm.py [--test 20000] [--negatives 4000] [--dim 384] [--processes 1] [--sample 500]

Descriptors are synthetic but clustered like a whitened, L2-normalised descriptors.parquet: test
writers and (other) train writers with 5 documents each. They are written to a temporary
descriptors.parquet, test and train rows interleaved, and --processes worker processes run at
the same time, each in a fresh interpreter so its peak RSS is its own (as one Snakemake job
per shard). Each worker reads the whole file, as encode_shard does. The data are made in a
subprocess too: Linux keeps ru_maxrss across exec, so a worker started by a big parent would
report the parent's peak as its own.

--sample N (default 500): the workers time the same per-document fit as encode_shard
(esvm.ExemplarTrainer) on a seeded sample of N test documents, split between them; the totals
for all --test documents are extrapolated from that and marked as such.
--sample 0: every worker runs encode_shard on its shard for real, and gather checks the result.
"""
import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETTINGS = {"C": 1000.0, "class_weight": "balanced"}


def clustered(n, dim, seed, spread=1.2):
    rng = np.random.default_rng(seed)
    writers = np.repeat(np.arange(n // 5 + 1), 5)[:n]
    centres = rng.standard_normal((writers.max() + 1, dim), dtype=np.float32)
    x = centres[writers] + spread * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), writers


def write_dataset(folder: Path, n_test, n_negatives, dim):
    """descriptors.parquet + index.parquet; rows interleaved so that shards hold equal shares of test rows."""
    import pandas as pd

    from writer_retrieval.pca import descriptor_table
    from writer_retrieval.storage import write_parquet

    test, test_writers = clustered(n_test, dim, seed=1)
    train, train_writers = clustered(n_negatives, dim, seed=2)
    order = np.random.default_rng(3).permutation(n_test + n_negatives)
    x = np.concatenate([test, train])[order]
    index = pd.DataFrame({"doc_id": [f"d{i:06d}" for i in range(len(x))],
                          "writer": np.concatenate([[f"test{w}" for w in test_writers],
                                                    [f"train{w}" for w in train_writers]])[order],
                          "split": np.array(["test"] * n_test + ["train"] * n_negatives)[order]})
    write_parquet(descriptor_table(index.doc_id, index, x), folder / "descriptors.parquet")
    index.to_parquet(folder / "index.parquet")


def sampled_worker(path, worker, processes, sample):
    """Time E-SVMs on this worker's part of a seeded sample of the test documents."""
    from writer_retrieval.esvm import ExemplarTrainer, train_rows
    from writer_retrieval.pca import read_descriptors

    start = time.perf_counter()
    table, matrix = read_descriptors(path)
    trainer = ExemplarTrainer(train_rows(table, matrix, path), SETTINGS)
    read_seconds = time.perf_counter() - start
    test = np.flatnonzero((table.split == "test").to_numpy())
    rows = np.sort(np.random.default_rng(0).choice(test, min(sample, len(test)), replace=False))[worker::processes]
    epochs, unconverged = [], 0
    start = time.perf_counter()
    for row in rows:
        _, converged = trainer.fit(matrix[row])
        epochs.append(int(trainer.svm.n_iter_))
        unconverged += not converged
    return {"n": len(rows), "seconds": time.perf_counter() - start, "read_seconds": read_seconds,
            "unconverged": unconverged, "mean_epochs": float(np.mean(epochs)) if epochs else 0.0}


def full_worker(path, worker, processes, folder):
    """encode_shard for real on shard `worker` of `processes`."""
    import pyarrow.parquet as pq

    from writer_retrieval.esvm import encode_shard

    n_rows = pq.read_metadata(path).num_rows
    start = time.perf_counter()
    n = encode_shard(path, path, SETTINGS, worker, math.ceil(n_rows / processes), folder / f"v{worker}.npy",
                     folder / f"i{worker}.parquet")
    return {"n": n, "seconds": time.perf_counter() - start, "read_seconds": 0.0, "unconverged": None,
            "mean_epochs": None}


def worker_main(args):
    path = Path(args.folder) / "descriptors.parquet"
    if args.sample:
        report = sampled_worker(path, args.worker, args.processes, args.sample)
    else:
        report = full_worker(path, args.worker, args.processes, Path(args.folder))
    report["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report))


def spawn(*args, **kwargs):
    return subprocess.Popen([sys.executable, __file__, *map(str, args)], **kwargs)


def baseline_mb():
    code = ("import json,resource,numpy,pandas,pyarrow.parquet,sklearn.svm,writer_retrieval.esvm;"
            "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024))")
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout)


def run_workers(args, folder):
    common = ["--folder", str(folder), "--processes", str(args.processes), "--sample", str(args.sample)]
    procs = [spawn("--worker", p, *common, stdout=subprocess.PIPE, text=True) for p in range(args.processes)]
    start = time.perf_counter()
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - start
    if any(p.returncode for p in procs):
        sys.exit("a worker failed (its error is above)")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs], wall


def report(args, reports, wall, base):
    total = sum(r["n"] for r in reports)
    kind = (f"seeded sample of {total} of the {args.test} test documents" if args.sample
            else f"all {total} test documents, encode_shard + gather for real")
    print(f"MEASURED ({kind}; {args.processes} process(es) at once; wall {wall:.1f} s):")
    for p, r in enumerate(reports):
        extra = (f", read + setup {r['read_seconds']:.1f} s, {r['mean_epochs']:.0f} liblinear epochs on average, "
                 f"{r['unconverged']} not converged" if args.sample else "")
        print(f"  process {p}: {r['n']} SVMs in {r['seconds']:.1f} s = {r['n'] / r['seconds']:.1f} SVMs/s, "
              f"peak RSS {r['peak_mb']:.0f} MB{extra}")
    rate = sum(r["n"] / r["seconds"] for r in reports)
    print(f"  together: {rate:.1f} SVMs/s; interpreter + libraries alone: {base:.0f} MB")
    if not args.sample:
        return
    per_process = math.ceil(args.test / args.processes)
    seconds = args.test / rate + max(r["read_seconds"] for r in reports)
    vectors_mb = max(0, per_process - min(r["n"] for r in reports)) * args.dim * 4 / 2**20
    print(f"EXTRAPOLATED (from the sample) to all {args.test} test documents on {args.processes} process(es):")
    print(f"  {seconds:.0f} s = {seconds / 60:.1f} min wall-clock ({per_process} SVMs per process)")
    print(f"  peak RSS per process ~{max(r['peak_mb'] for r in reports) + vectors_mb:.0f} MB "
          f"(measured + {vectors_mb:.0f} MB of output vectors; the training matrix is reused, not grown)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--test", type=int, default=20000)
    ap.add_argument("--negatives", type=int, default=4000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--sample", type=int, default=500, help="test documents to time; 0 = all, for real")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        return worker_main(args)
    if args.make:
        return write_dataset(Path(args.folder), args.test, args.negatives, args.dim)
    print(f"E-SVM: {args.test} test documents x {args.negatives} train negatives, D = {args.dim}, "
          f"C = {SETTINGS['C']:g}, class_weight = {SETTINGS['class_weight']}")
    base = baseline_mb()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        if spawn("--make", "--folder", folder, "--test", args.test, "--negatives", args.negatives,
                 "--dim", args.dim).wait():
            sys.exit("making the synthetic descriptors failed")
        print(f"synthetic descriptors.parquet written in {time.perf_counter() - start:.1f} s")
        reports, wall = run_workers(args, folder)
        if not args.sample:
            from writer_retrieval.esvm import gather

            shards = range(args.processes)
            gather([folder / f"v{p}.npy" for p in shards], [folder / f"i{p}.parquet" for p in shards],
                   folder / "descriptors.parquet", folder / "index.parquet", folder / "esvm.parquet",
                   folder / "esvm.json")
            print(f"gather: {json.loads((folder / 'esvm.json').read_text())['n_encoded']} test documents, "
                  "each exactly once")
    report(args, reports, wall, base)


if __name__ == "__main__":
    main()
