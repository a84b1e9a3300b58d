"""Time the synthetic generator and the binarizers; prints seconds per page and peak memory.

    python bench/bench_binarize.py [--sizes 1000x1300 3000x4000] [--pages 3]

Pages come from the synthetic generator (so ground truth exists); larger sizes approximate
competition scans (ICDAR2017 pages are about 3000x4000 px).
"""
import argparse
import resource
import tempfile
import time
from pathlib import Path

from writer_retrieval.binarize import binarize_page, pixel_quality
from writer_retrieval.imaging import load_gray, read_mask
from writer_retrieval.synthetic import generate_collection


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["1000x1300", "3000x4000"])
    ap.add_argument("--pages", type=int, default=3)
    args = ap.parse_args()
    methods = [{"method": "otsu"}, {"method": "sauvola", "window": 51, "k": 0.2}]
    print(f"{'size':>10} {'stage':>18} {'s/page':>8} {'F-measure':>9} {'PSNR':>6}")
    for size in args.sizes:
        w, h = map(int, size.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            table = generate_collection(Path(tmp), writers=args.pages, pages_per_writer=1, train_writers=1,
                                        page_width=w, page_height=h, difficulty=0.5, seed=0, progress=False)
            print(f"{size:>10} {'generate':>18} {(time.perf_counter() - t0) / len(table):8.3f}")
            pages = [(load_gray(r.path), read_mask(r.ink_mask)) for r in table.itertuples()]
            for settings in methods:
                t0 = time.perf_counter()
                scores = [pixel_quality(binarize_page(g, settings)[0], m) for g, m in pages]
                dt = (time.perf_counter() - t0) / len(pages)
                f = sum(s["f_measure"] for s in scores) / len(scores)
                psnr = sum(s["psnr"] for s in scores) / len(scores)
                print(f"{size:>10} {'binarize ' + settings['method']:>18} {dt:8.3f} {f:9.4f} {psnr:6.2f}")
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
