"""Embedding throughput (windows/s) of ViT backbones on this machine, next to a FLOP-bound ceiling.

    python bench/bench_embed.py [--batch 32] [--seconds 10] [--device cpu]

The ceiling is (FLOPs per 224x224 window) / (measured float32 matmul FLOP/s): what the
machine could do if the whole forward pass ran at matmul speed.
"""
import argparse
import time

import torch

from writer_retrieval.devices import resolve_device
from writer_retrieval.embed import embed_windows
from writer_retrieval.vit import build_backbone

MODELS = {
    "ViT-S/16 (paper)": {"arch": "vit_small_patch16_224", "img_size": 224, "patch_size": 16},
    "demo ViT (dim 192, depth 4)": {"arch": "vit_tiny_patch16_224", "img_size": 224, "patch_size": 16,
                                    "embed_dim": 192, "depth": 4, "num_heads": 3},
}


def vit_flops(model, window=224, in_chans=1, mlp_ratio=4) -> float:
    n = (window // model.patch_embed.patch_size[0]) ** 2 + 1
    d = model.embed_dim
    depth = len(model.blocks)
    per_block = 2 * n * (4 * d * d + 2 * mlp_ratio * d * d) + 2 * 2 * n * n * d
    patch = 2 * (n - 1) * (model.patch_embed.patch_size[0] ** 2 * in_chans) * d
    return depth * per_block + patch


def matmul_flops_per_second(device, size=2048, seconds=3.0) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * n / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    rate = matmul_flops_per_second(device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, float32 matmul {rate / 1e9:.1f} GFLOP/s")
    settings = {"layers": 1, "fuse": "concat"}
    windows = torch.rand(args.batch, 224, 224).numpy() > 0.9
    for name, spec in MODELS.items():
        model = build_backbone(spec, seed=0).to(device).eval()
        embed_windows(model, windows[:2], settings, device)  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            embed_windows(model, windows, settings, device)
            n += len(windows)
        measured = n / (time.perf_counter() - start)
        flops = vit_flops(model)
        print(f"{name:30s} {flops / 1e9:6.2f} GFLOP/window  {measured:8.1f} windows/s  "
              f"ceiling {rate / flops:8.1f} windows/s  ({100 * measured * flops / rate:.0f}% of matmul rate)")


if __name__ == "__main__":
    main()
