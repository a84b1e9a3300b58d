"""Reranking at scale: seconds and peak memory of kRNN, SGR and GNN on sparse top-k graphs.

    python bench/bench_rerank.py [--sizes 20000 100000] [--dense 5000] [--dim 384]

Descriptors are random but clustered (writers with 5 documents each, 384-d, L2-normalised).
Each (method, N) runs in a fresh process so its peak RSS is its own. The dense reference
(N x N matrices, as the published code) runs at N = --dense for comparison.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def clustered(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    writers = np.repeat(np.arange(n // 5 + 1), 5)[:n]
    centres = rng.standard_normal((writers.max() + 1, dim), dtype=np.float32)
    x = centres[writers] + 1.2 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), writers


def dense_reference(method, x):
    """The published dense formulation (N x N, float32), vectorised with numpy."""
    s = x @ x.T
    n = len(x)
    if method == "krnn":
        k = 2
        np.fill_diagonal(s, -np.inf)
        nk = np.argpartition(-s, k, axis=1)[:, :k]
        knn = np.zeros((n, n), bool)
        knn[np.repeat(np.arange(n), k), nk.ravel()] = True
        r = (knn & knn.T).astype(np.float32)
        out = (x + r @ x) / (r.sum(1, keepdims=True) + 1)
        return out
    if method == "sgr":
        a = np.exp(-((1 - s) ** 2) / 0.5)
        a = (a + a.T) / 2
        nbrs = np.argsort(-a, axis=1)[:, 1:3]
        w = np.zeros((n, n), np.float32)
        w[np.repeat(np.arange(n), 2), nbrs.ravel()] = s[np.repeat(np.arange(n), 2), nbrs.ravel()]
        a = a + w @ a
        return a / np.linalg.norm(a, axis=1, keepdims=True)
    if method == "gnn":
        order = np.argsort(-s, axis=1)
        a = np.zeros((n, n), np.float32)
        a[np.repeat(np.arange(n), 2), order[:, :2].ravel()] = 1
        a = (a + a.T) / 2
        w = np.zeros((n, n), np.float32)
        w[np.repeat(np.arange(n), 3), order[:, :3].ravel()] = s[np.repeat(np.arange(n), 3), order[:, :3].ravel()] ** 2
        a = a + w @ a
        return a / np.linalg.norm(a, axis=1, keepdims=True)
    raise ValueError(method)


def one(method, n, dim, dense):
    from writer_retrieval.rerank import rerank

    x, _ = clustered(n, dim)
    settings = {"krnn": {"method": "krnn", "k": 2},
                "sgr": {"method": "sgr", "k": 2, "layers": 1, "gamma": 0.5, "m": 100},
                "gnn": {"method": "gnn", "k1": 1, "k2": 2, "layers": 1, "m": 100}}[method]
    start = time.perf_counter()
    dense_reference(method, x) if dense else rerank(x, settings)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[20000, 100000])
    ap.add_argument("--dense", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--one", nargs=3)
    args = ap.parse_args()
    if args.one:
        method, n, dense = args.one
        one(method, int(n), args.dim, dense == "dense")
        return
    base = json.loads(subprocess.run([sys.executable, "-c", "import json,resource,numpy,faiss,scipy.sparse;"
                                      "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024))"],
                                     capture_output=True, text=True, check=True).stdout)
    print(f"{'method':>6} {'N':>7} {'kind':>6} {'seconds':>8} {'peak MB':>8}   (interpreter + libraries alone: {base:.0f} MB)")
    runs = [(m, args.dense, "dense") for m in ("krnn", "sgr", "gnn")]
    runs += [(m, n, "sparse") for n in [args.dense, *args.sizes] for m in ("krnn", "sgr", "gnn")]
    for method, n, kind in runs:
        out = subprocess.run([sys.executable, __file__, "--dim", str(args.dim), "--one", method, str(n), kind],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{method:>6} {n:>7} {kind:>6} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{method:>6} {n:>7} {kind:>6} {r['seconds']:8.1f} {r['peak_mb']:8.0f}")


if __name__ == "__main__":
    main()
