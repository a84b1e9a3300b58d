"""Bootstrap at scale: seconds and peak memory of writer_bootstrap and paired_comparison.

    python bench/bench_bootstrap.py [--queries 100000] [--writers 10000] [--replicates 1000]

Per-query tables are synthetic: every writer has at least one query, the rest fall on writers
at random (unequal counts, as in real collections); AP has a per-writer effect so queries of a
writer are correlated. writer_bootstrap runs on ap and top1 together (a (Q, 2) array);
paired_comparison on a method table that is the baseline plus per-query noise. Each case runs
in a fresh process so its peak RSS is its own; 'before' is the peak once the tables are built.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import pandas as pd


def per_query_table(n_queries, n_writers, seed=0, shift=0.0):
    same = np.random.default_rng(99)  # the same queries, writers and writer effects in both tables
    writers = np.concatenate([np.arange(n_writers), same.integers(0, n_writers, n_queries - n_writers)])
    effect = same.normal(0, 1, n_writers)
    rng = np.random.default_rng(seed)
    ap = 1 / (1 + np.exp(-(effect[writers] + rng.normal(0, 1, n_queries) + shift)))
    rank = np.where(rng.random(n_queries) < ap, 1, rng.integers(2, 50, n_queries))
    return pd.DataFrame({"query_doc_id": [f"d{i:07d}" for i in range(n_queries)],
                         "writer": [f"w{w:05d}" for w in writers], "ap": ap, "first_hit_rank": rank,
                         "n_relevant": 4, "gallery_size": n_queries})


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(case, n_queries, n_writers, n_boot):
    from writer_retrieval.bootstrap import paired_comparison, per_query_metrics, writer_bootstrap

    baseline = per_query_table(n_queries, n_writers)
    if case == "writer_bootstrap":
        values, writers = per_query_metrics(baseline), baseline["writer"].to_numpy()
        before = peak_mb()
        start = time.perf_counter()
        ci = writer_bootstrap(values, writers, n_boot=n_boot, seed=0)
        result = {"map_ci": ci[0].tolist(), "top1_ci": ci[1].tolist()}
    else:
        method = per_query_table(n_queries, n_writers, seed=1, shift=0.05)
        before = peak_mb()
        start = time.perf_counter()
        out = paired_comparison(method, baseline, n_boot=n_boot, seed=0)
        result = {"delta_ci": [out["delta_map_ci_low"], out["delta_map_ci_high"]]}
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "before_mb": before, "peak_mb": peak_mb(), **result}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=100000)
    ap.add_argument("--writers", type=int, default=10000)
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--one", nargs=4)
    args = ap.parse_args()
    if args.one:
        case, q, w, b = args.one
        one(case, int(q), int(w), int(b))
        return
    base = json.loads(subprocess.run([sys.executable, "-c", "import json,resource,numpy,pandas;"
                                      "import writer_retrieval.bootstrap;"
                                      "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024))"],
                                     capture_output=True, text=True, check=True).stdout)
    print(f"Q = {args.queries}, W = {args.writers}, B = {args.replicates} replicates "
          f"(interpreter + libraries alone: {base:.0f} MB)")
    print(f"{'case':>17} {'seconds':>8} {'before MB':>10} {'peak MB':>8}   interval(s)")
    for case in ("writer_bootstrap", "paired_comparison"):
        out = subprocess.run([sys.executable, __file__, "--one", case, str(args.queries), str(args.writers),
                              str(args.replicates)], capture_output=True, text=True)
        if out.returncode:
            print(f"{case:>17} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        cis = "  ".join(f"{k} [{v[0]:.4f}, {v[1]:.4f}]" for k, v in r.items() if k.endswith("_ci"))
        print(f"{case:>17} {r['seconds']:8.2f} {r['before_mb']:10.0f} {r['peak_mb']:8.0f}   {cis}")


if __name__ == "__main__":
    main()
