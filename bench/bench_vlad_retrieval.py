"""VLAD encoding throughput (vectorised vs. a residual-tensor implementation) and exact retrieval time.

    python bench/bench_vlad_retrieval.py [--descriptors 100000] [--docs 20000] [--dim 384]

Prints descriptors/s for both encoders on the same data (outputs checked equal), and the
time of leave-one-out retrieval with metrics over N documents x `dim` dims (faiss exact
inner product, full rankings for mAP).
"""
import argparse
import resource
import time

import numpy as np

from writer_retrieval.metrics import evaluate
from writer_retrieval.vlad import assign, encode, normalise


def residual_tensor_vlad(x, centroids):
    """The straightforward way: an N x C x D residual tensor masked by the one-hot assignment
    (same nearest-centroid search, so the outputs must agree to rounding)."""
    residuals = x[:, None, :].astype(np.float64) - centroids[None, :, :]
    nearest = assign(x, centroids)
    onehot = np.zeros((len(x), len(centroids)), bool)
    onehot[np.arange(len(x)), nearest] = True
    return (residuals * onehot[:, :, None]).sum(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--descriptors", type=int, default=20000)
    ap.add_argument("--codebook", type=int, default=100)
    ap.add_argument("--local-dim", type=int, default=128)
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=384)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((args.descriptors, args.local_dim), dtype=np.float32)
    centroids = rng.random((args.codebook, args.local_dim), dtype=np.float32)
    settings = {"chunk_size": 65536, "intra_norm": False, "power": 0.5}

    t0 = time.perf_counter()
    fast = encode(x, centroids, settings)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = normalise(residual_tensor_vlad(x, centroids), intra=False, power=0.5)
    t_slow = time.perf_counter() - t0
    assert np.allclose(fast, slow, atol=1e-5), "encoders disagree"
    tensor_gb = args.descriptors * args.codebook * args.local_dim * 8 / 1e9
    print(f"VLAD, {args.descriptors} descriptors x {args.local_dim} dims, C = {args.codebook} (outputs equal):")
    print(f"  vectorised       {args.descriptors / t_fast:12,.0f} descriptors/s  ({t_fast:.3f} s)")
    print(f"  residual tensor  {args.descriptors / t_slow:12,.0f} descriptors/s  ({t_slow:.3f} s, "
          f"{tensor_gb:.2f} GB tensor)")

    centres = rng.normal(size=(args.docs // 5, args.dim)).astype(np.float32)
    writers = np.repeat(np.arange(len(centres)), 5)[: args.docs]
    docs = centres[writers] + rng.normal(scale=1.5, size=(len(writers), args.dim)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    t0 = time.perf_counter()
    metrics, rankings = evaluate(docs, writers, top_k=100)
    t_ret = time.perf_counter() - t0
    print(f"retrieval, N = {len(docs)} x {args.dim} dims, exact, full rankings + top-100 table: {t_ret:.1f} s "
          f"(mAP {metrics['map']:.4f}, {len(rankings):,} ranking rows)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
