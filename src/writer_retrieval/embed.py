"""Embedding stage: ViT tokens of binarized pages, in windows, foreground patch tokens only.

A page is cut into `window` x `window` windows every `stride` pixels. Windows reaching past the
right or bottom border are padded with paper (no ink), so no writing is lost and every window
has the network's input size. Windows without a single foreground patch are skipped before
the forward pass. A patch token is foreground when its patch holds >= `t_fg` ink pixels.
Tokens come from the final norm layer; with `layers: k` the last k blocks' tokens (each
through the final norm) are fused by concatenation or mean. Per page we keep the foreground
patch tokens (-> VLAD) and the [CLS] token of every kept window (-> sum pooling).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .binarize import shard_rows
from .devices import resolve_device
from .imaging import read_mask
from .storage import write_array_shard, write_parquet
from .vit import build_backbone, forward_tokens, load_backbone, to_input

log = logging.getLogger("writer_retrieval")


def _starts(length: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, max(length - window, 0) + 1, stride))
    if starts[-1] + window < length:  # the grid stopped short of the border: one more, padded
        starts.append(starts[-1] + stride)
    return starts


def page_windows(ink: np.ndarray, window: int, stride: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """All windows of a page (n, window, window) bool, padded with paper past the borders, and their origins."""
    h, w = ink.shape
    ys, xs = _starts(h, window, stride), _starts(w, window, stride)
    padded = np.zeros((ys[-1] + window, xs[-1] + window), bool)
    padded[:h, :w] = ink
    origins = [(y, x) for y in ys for x in xs]
    return np.stack([padded[y:y + window, x:x + window] for y, x in origins]), origins


def foreground_patches(windows: np.ndarray, patch: int, t_fg: int) -> np.ndarray:
    """(n, N) bool: patches (row-major, as the ViT orders its tokens) with >= t_fg ink pixels."""
    n, hgt, wid = windows.shape
    counts = windows.reshape(n, hgt // patch, patch, wid // patch, patch).sum(axis=(2, 4))
    return (counts >= t_fg).reshape(n, -1)


def fuse_layers(layers: list[torch.Tensor], fuse: str) -> torch.Tensor:
    if len(layers) == 1:
        return layers[0]
    if fuse == "concat":
        return torch.cat(layers, dim=-1)
    if fuse == "mean":
        return torch.stack(layers).mean(dim=0)
    raise ValueError(f"unknown layer fusion {fuse!r}; allowed: concat, mean")


@torch.no_grad()
def embed_windows(backbone, windows: np.ndarray, settings: dict, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] (n, D') and patch tokens (n, N, D') of a batch of windows (fused over the chosen layers)."""
    images = torch.stack([to_input(w) for w in windows]).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        out = forward_tokens(backbone, images, return_layers=settings["layers"])
    layers = list(out) if isinstance(out, (list, tuple)) else [out]
    tokens = fuse_layers([t.float() for t in layers], settings["fuse"])
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    return tokens[:, 0].cpu().numpy(), tokens[:, prefix:].cpu().numpy()


def embed_page(backbone, ink: np.ndarray, settings: dict, patch: int, device: torch.device) -> dict:
    """Foreground patch tokens and window [CLS] tokens of one page, with counts."""
    windows, _ = page_windows(ink, settings["window"], settings["stride"])
    fg = foreground_patches(windows, patch, settings["t_fg"])
    keep = fg.any(axis=1)  # windows without any foreground patch never reach the network
    kept, kept_fg = windows[keep], fg[keep]
    cls_parts, token_parts = [], []
    for start in range(0, len(kept), settings["batch_size"]):
        cls, tokens = embed_windows(backbone, kept[start:start + settings["batch_size"]], settings, device)
        cls_parts.append(cls)
        token_parts.append(tokens[kept_fg[start:start + settings["batch_size"]]])
    dim = None if not cls_parts else cls_parts[0].shape[1]
    return {"cls": np.concatenate(cls_parts) if cls_parts else np.zeros((0, 0), np.float32),
            "tokens": np.concatenate(token_parts) if token_parts else np.zeros((0, 0), np.float32),
            "n_windows": len(windows), "n_windows_embedded": int(keep.sum()), "dim": dim}


def load_model(settings: dict, backbone_path, device: torch.device):
    """The trained student backbone, or (no pretraining) a randomly initialised one with a fixed seed."""
    if backbone_path:
        return load_backbone(backbone_path, settings["model"], device=device)
    model = build_backbone(settings["model"], seed=settings["seed"]).to(device)
    return model.eval()


def embed_shard(index_path, masks_table, shard: int, shard_size: int, settings: dict, backbone_path,
                tokens_path, cls_path, shard_index_path, stats_path, device: str = "auto") -> pd.DataFrame:
    """Embed one shard of the index; float16 token shards with a Parquet index and per-page stats."""
    dev = resolve_device(device)
    torch.manual_seed(settings["seed"])
    backbone = load_model(settings, backbone_path, dev)
    patch = settings["model"]["patch_size"]
    if settings["window"] % patch:
        raise ValueError(f"embed window {settings['window']} is not a multiple of the patch size {patch}")
    rows = shard_rows(pd.read_parquet(index_path), shard, shard_size)
    mask_of = dict(pd.read_parquet(masks_table, columns=["doc_id", "mask_path"]).itertuples(index=False))
    tokens, cls, stats = {}, {}, []
    width = None
    for doc in tqdm(rows.itertuples(index=False), total=len(rows), desc=f"embed shard {shard}", unit="page",
                    mininterval=2):
        start = time.perf_counter()
        out = embed_page(backbone, read_mask(mask_of[doc.doc_id]), settings, patch, dev)
        width = out["dim"] or width
        tokens[doc.doc_id], cls[doc.doc_id] = out["tokens"].astype(np.float16), out["cls"].astype(np.float16)
        if len(out["tokens"]) == 0:
            log.warning("%s: no foreground tokens (no window with a patch of >= %d ink pixels)", doc.path,
                        settings["t_fg"])
        stats.append({"doc_id": doc.doc_id, "writer": doc.writer, "split": doc.split, "n_windows": out["n_windows"],
                      "n_windows_embedded": out["n_windows_embedded"], "n_tokens": len(out["tokens"]),
                      "seconds": time.perf_counter() - start})
    write_token_shard(tokens, cls, shard, width or token_width(settings), tokens_path, cls_path, shard_index_path)
    table = pd.DataFrame(stats)
    write_parquet(table, stats_path)
    return table


def write_token_shard(tokens: dict, cls: dict, shard: int, width: int, tokens_path, cls_path, index_path) -> None:
    """The patch tokens and the window [CLS] tokens of a shard's pages (float16 array shards) with
    one Parquet index: n_tokens / offset locate a page's tokens (vlad.load_tokens), n_windows /
    cls_offset its [CLS] rows (pca.sum_pooled_cls)."""
    t = write_array_shard(tokens, tokens_path, None, np.float16, width, count="n_tokens")
    c = write_array_shard(cls, cls_path, None, np.float16, width, count="n_windows", offset="cls_offset")
    write_parquet(pd.DataFrame({"doc_id": t.doc_id, "n_tokens": t.n_tokens, "shard": shard, "offset": t.offset,
                                "n_windows": c.n_windows, "cls_offset": c.cls_offset}), index_path)


def token_width(settings: dict) -> int:
    dim = build_backbone(settings["model"]).embed_dim
    return dim * settings["layers"] if settings["fuse"] == "concat" else dim
