"""GPU readiness check of the training and embedding stages; run it through bench/gpu_check.sh.

On CUDA (bf16, the paper's sizes: settings = the schema's defaults) it
1. trains AttMask ViT-S/16 (384-d, 12 layers, 6 heads; 2 x 224 global + 8 x 96 local crops,
   batch 128, augment_on: device) on synthetic stroke pages for 2 epochs of --steps iterations
   and reports the second epoch's images/s (the first warms up) and the peak GPU memory;
2. the same for SAGHOG (width 512, depth 8, 32 x 32 patches, batch 256);
3. embeds 224 x 224 windows with ViT-S/16 (bf16, batch 256) through embed.embed_windows and
   reports windows/s (and the forward pass alone, inputs already on the GPU);
4. runs the project's torchrun entry (python -m writer_retrieval.pretrain) with one process
   (nccl on CUDA, gloo on the CPU) for a few steps;
5. trains 2 epochs, and 1 epoch + a resumed one from its checkpoint, and compares the epoch
   losses and final weights: equal bit for bit on the CPU; on CUDA within a relative 1e-2
   (atomic-add kernels and bf16 make GPU training non-deterministic).
The summary block at the end holds every figure and the targets (AttMask >= 1500 images/s,
embedding >= 10000 windows/s on an H100-class GPU) with PASS / MISS. --device cpu runs tiny
sizes (a smoke test of the same code paths). Exit status 1 when step 4 or 5 fails.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from writer_retrieval import embed, pretrain
from writer_retrieval.imaging import write_mask
from writer_retrieval.pretrain.saghog import model_with_defaults
from writer_retrieval.vit import forward_tokens

TARGETS = {"attmask": 1500.0, "embed": 10000.0}
VIT_S16 = {"arch": "vit_small_patch16_224", "img_size": 224, "patch_size": 16}
TINY_VIT = {"arch": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2,
            "num_heads": 2}
# Overrides of the schema's (= the paper's) defaults; "tiny" keeps the CPU smoke run short.
SIZES = {
    "paper": {"model": VIT_S16, "attmask": {}, "saghog": {"batch_size": 256}, "embed": {"batch_size": 256},
              "page": 2048, "check_batch": 32},
    "tiny": {"model": TINY_VIT,
             "attmask": {"global_size": 64, "local_size": 32, "n_local_crops": 2, "batch_size": 4, "window": 96,
                         "out_dim": 64, "patch_out_dim": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
             "saghog": {"batch_size": 16, "model": {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_dim": 32,
                                                    "decoder_heads": 2}},
             "embed": {"window": 64, "stride": 64, "batch_size": 8}, "page": 320, "check_batch": 4},
}


def schema_defaults(*path: str) -> dict:
    """The defaults of the config schema's properties at `path` ("$defs", "attmask", ...)."""
    import yaml

    node = yaml.safe_load(resources.files("writer_retrieval").joinpath("config.schema.yaml").read_text())
    for key in path:
        node = node[key]
    return {k: v["default"] for k, v in node["properties"].items() if "default" in v}


def attmask_settings(size: dict, **over) -> dict:
    return {**schema_defaults("$defs", "attmask"), "method": "attmask", "model": dict(size["model"]), "seed": 0,
            "augment_on": "device", **size["attmask"], **over}


def stroke_pages(folder: Path, n: int, side: int) -> list[str]:
    """n seeded binary pages side x side of short pen strokes (about 10 % ink), as mask files."""
    import cv2

    paths = []
    for p in range(n):
        rng = np.random.default_rng([7, p])
        page = np.zeros((side, side), np.uint8)
        count = side * side // 4000 + 4
        pts = rng.integers(0, side, size=(count, 1, 2)) + rng.integers(-25, 26, size=(count, 4, 2))
        cv2.polylines(page, list(pts.astype(np.int32)), False, 1, thickness=3)
        paths.append(str(folder / f"page{p:03d}.png"))
        write_mask(paths[-1], page > 0)
    return paths


class Peak:
    """Peak GPU memory allocated inside the block (GiB; None on the CPU)."""

    def __init__(self, dev: torch.device):
        self.dev, self.gib = dev, None

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            self.gib = torch.cuda.max_memory_allocated(self.dev) / 2**30


def train_attmask(pages, size, steps, dev, out: Path) -> dict:
    batch = int(attmask_settings(size)["batch_size"])
    s = attmask_settings(size, epochs=2, max_windows=steps * batch)
    with Peak(dev) as peak:
        res = pretrain.pretrain(pages, s, out, device=str(dev), progress=False)
    what = (f"{s['model']['arch']}, batch {batch}, 2x{s['global_size']} + {s['n_local_crops']}x{s['local_size']} "
            f"crops, augment_on {s['augment_on']}")
    return {"rate": res["images_per_second"], "peak": peak.gib, "what": what}


def patch_shard(pages, n: int, folder: Path) -> list[tuple[str, str]]:
    """n 32 x 32 patches cut at seeded places of the pages: one patch shard (patches.npy, index.parquet)."""
    import pandas as pd

    from writer_retrieval.imaging import read_mask

    rng = np.random.default_rng(3)
    inks = [read_mask(p) for p in pages]
    which = rng.integers(0, len(inks), n)
    ys, xs = rng.integers(0, inks[0].shape[0] - 32, n), rng.integers(0, inks[0].shape[1] - 32, n)
    patches = np.stack([inks[p][y:y + 32, x:x + 32] for p, y, x in zip(which, ys, xs)]).astype(np.uint8)
    np.save(folder / "patches.npy", patches)
    pd.DataFrame({"doc_id": [f"page{p}" for p in which]}).to_parquet(folder / "index.parquet")
    return [(str(folder / "patches.npy"), str(folder / "index.parquet"))]


def train_saghog(pages, size, steps, dev, out: Path) -> dict:
    batch = int(size["saghog"]["batch_size"])
    s = {"method": "saghog", "epochs": 2, "max_patches": steps * batch, **size["saghog"]}
    shards = patch_shard(pages, steps * batch, out.parent)
    with Peak(dev) as peak:
        res = pretrain.run({"patch_shards": shards, "doc_ids": None}, s, out, device=str(dev), progress=False)
    m = model_with_defaults(s.get("model"))
    what = f"width {m['embed_dim']}, depth {m['depth']}, {m['img_size']}x{m['img_size']} patches, batch {batch}"
    return {"rate": res["images_per_second"], "peak": peak.gib, "what": what}


def embed_rate(pages, size, steps, dev) -> dict:
    """windows/s of embed.embed_windows (host windows in, host tokens out) and of the forward alone."""
    from writer_retrieval.imaging import read_mask

    s = {**schema_defaults("$defs", "vit", "properties", "embed"), "model": dict(size["model"]), "seed": 0,
         **size["embed"]}
    backbone = embed.load_model(s, None, dev)
    windows = np.concatenate([embed.page_windows(read_mask(p), s["window"], s["stride"])[0] for p in pages])
    bs = int(s["batch_size"])
    batches = [windows[i:i + bs] for i in range(0, len(windows) - bs + 1, bs)]
    with Peak(dev) as peak:
        embed.embed_windows(backbone, batches[0], s, dev)  # warm-up
        t0 = time.perf_counter()
        for i in range(steps):
            embed.embed_windows(backbone, batches[i % len(batches)], s, dev)
        rate = steps * bs / (time.perf_counter() - t0)
    images = torch.from_numpy(batches[0]).to(dev).float()[:, None]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    with torch.no_grad(), autocast:
        forward_tokens(backbone, images)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            forward_tokens(backbone, images)
        sync(dev)
    what = f"{s['model']['arch']}, {s['window']}x{s['window']} windows, batch {bs}"
    return {"rate": rate, "forward": steps * bs / (time.perf_counter() - t0), "peak": peak.gib, "what": what}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def torchrun(pages, size, steps, dev, folder: Path) -> dict:
    """The pretrain rule's command with one process; ok when it exits 0 and logs one epoch."""
    import pandas as pd

    batch = int(size["check_batch"])
    job = folder / "inputs.json"
    job.write_text(json.dumps({"inputs": {"page_masks": pages}, "device": dev.type, "settings": attmask_settings(
        size, epochs=1, batch_size=batch, max_windows=steps * batch)}))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "-m", "writer_retrieval.pretrain", "--job", str(job), "--out", str(folder / "out"),
                           "--no-progress"], capture_output=True, text=True, timeout=240, env=env)
    log = folder / "out" / "log.parquet"
    ok = proc.returncode == 0 and "world size 1" in proc.stderr and log.exists() and len(pd.read_parquet(log)) == 1
    if not ok:
        print(proc.stderr[-4000:], file=sys.stderr)
    return {"ok": ok, "seconds": time.perf_counter() - t0, "steps": steps,
            "backend": "nccl" if dev.type == "cuda" else "gloo"}


def resume(pages, size, steps, dev, folder: Path) -> dict:
    """2 epochs straight vs 1 epoch, stop, resume from checkpoint.pt: epoch losses and weights."""
    import pandas as pd

    batch = int(size["check_batch"])
    s = attmask_settings(size, epochs=2, batch_size=batch, max_windows=steps * batch)
    run = dict(device=str(dev), progress=False)
    pretrain.pretrain(pages, s, folder / "straight", **run)
    pretrain.pretrain(pages, s, folder / "resumed", stop_after_epochs=1, **run)
    resumed = pretrain.pretrain(pages, s, folder / "resumed", **run)
    la, lb = (pd.read_parquet(folder / name / "log.parquet").loss.to_numpy() for name in ("straight", "resumed"))
    wa, wb = (torch.load(folder / name / "backbone.pt", weights_only=True) for name in ("straight", "resumed"))
    weight_diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    rtol = 0.0 if dev.type == "cpu" else 1e-2
    same = np.allclose(la, lb, rtol=rtol, atol=0.0) and (dev.type != "cpu" or weight_diff == 0.0)
    return {"ok": bool(same and resumed["resumed_from_epoch"] == 1 and len(la) == 2), "rtol": rtol,
            "loss_diff": float(np.abs(la - lb).max()), "weight_diff": weight_diff, "steps": steps}


def verdict(value: float, target: float, dev: torch.device, size: str) -> str:
    if dev.type != "cuda" or size != "paper":
        return "n/a (targets are for CUDA at the paper's sizes)"
    return "PASS" if value >= target else "MISS"


def gib(value) -> str:
    return "n/a (cpu)" if value is None else f"{value:.2f} GiB"


def summary(r: dict, dev: torch.device, size: str, steps: int, seconds: float) -> list[str]:
    a, g, e, d, c = r["attmask"], r["saghog"], r["embed"], r["torchrun"], r["resume"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    precision = "bf16" if dev.type == "cuda" else "fp32"
    return [
        f"== gpu_check summary: device {dev} ({name}), {precision}, sizes {size}, {steps} steps per epoch ==",
        f"attmask_train: {a['rate']:.1f} images/s, peak {gib(a['peak'])} ({a['what']}); "
        f"target >= {TARGETS['attmask']:.0f} images/s: {verdict(a['rate'], TARGETS['attmask'], dev, size)}",
        f"saghog_train: {g['rate']:.1f} images/s, peak {gib(g['peak'])} ({g['what']})",
        f"embed: {e['rate']:.1f} windows/s (forward alone {e['forward']:.1f}), peak {gib(e['peak'])} ({e['what']}); "
        f"target >= {TARGETS['embed']:.0f} windows/s: {verdict(e['rate'], TARGETS['embed'], dev, size)}",
        f"torchrun_ddp: {'PASS' if d['ok'] else 'FAIL'} (backend {d['backend']}, world size 1, {d['steps']} steps, "
        f"{d['seconds']:.1f} s)",
        f"resume: {'PASS' if c['ok'] else 'FAIL'} (epoch losses within rtol {c['rtol']:g}: exact on cpu, 1e-2 on "
        f"cuda; max |loss diff| {c['loss_diff']:.3g}, max |weight diff| {c['weight_diff']:.3g}, {c['steps']} "
        "steps per epoch)",
        f"total: {seconds:.1f} s",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=50, help="iterations per measured epoch (default 50)")
    parser.add_argument("--size", choices=sorted(SIZES), help="default: paper on cuda, tiny on cpu")
    args = parser.parse_args(argv)
    size_name = args.size or ("paper" if args.device == "cuda" else "tiny")
    size, steps, dev = SIZES[size_name], max(int(args.steps), 1), pretrain.resolve_device(args.device)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    short = min(steps, 5)  # the torchrun and resume checks need only a few steps
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        root = Path(tmp)
        for name in ("pages", "attmask", "saghog", "torchrun", "resume"):
            (root / name).mkdir()
        batch = int(attmask_settings(size)["batch_size"])
        window = int(attmask_settings(size)["window"])
        per_page = ((size["page"] - window) // (window // 2) + 1) ** 2
        pages = stroke_pages(root / "pages", -(-steps * batch // per_page) + 1, size["page"])
        results = {"attmask": train_attmask(pages, size, steps, dev, root / "attmask" / "out"),
                   "saghog": train_saghog(pages, size, steps, dev, root / "saghog" / "out"),
                   "embed": embed_rate(pages, size, steps, dev),
                   "torchrun": torchrun(pages, size, short, dev, root / "torchrun"),
                   "resume": resume(pages, size, short, dev, root / "resume")}
    lines = summary(results, dev, size_name, steps, time.perf_counter() - t0)
    print("\n".join(lines), flush=True)
    return 0 if results["torchrun"]["ok"] and results["resume"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
