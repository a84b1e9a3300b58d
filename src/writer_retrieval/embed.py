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
from .imaging import read_mask
from .storage import write_npy, write_parquet

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
    from .pretrain import forward_tokens, to_input

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
    from .pretrain import build_backbone, load_backbone

    if backbone_path:
        return load_backbone(backbone_path, settings["model"], device=device)
    model = build_backbone(settings["model"], seed=settings["seed"]).to(device)
    return model.eval()


def embed_shard(index_path, masks_table, shard: int, shard_size: int, settings: dict, backbone_path,
                tokens_path, cls_path, shard_index_path, stats_path, device: str = "auto") -> pd.DataFrame:
    """Embed one shard of the index; float16 token shards with a Parquet index and per-page stats."""
    from .pretrain import resolve_device

    dev = resolve_device(device)
    torch.manual_seed(settings["seed"])
    backbone = load_model(settings, backbone_path, dev)
    patch = settings["model"]["patch_size"]
    if settings["window"] % patch:
        raise ValueError(f"embed window {settings['window']} is not a multiple of the patch size {patch}")
    index = pd.read_parquet(index_path)
    rows = shard_rows(index, shard, shard_size)
    mask_of = dict(pd.read_parquet(masks_table, columns=["doc_id", "mask_path"]).itertuples(index=False))
    token_parts, cls_parts, entries, stats = [], [], [], []
    offset = cls_offset = 0
    width = None
    for doc in tqdm(rows.itertuples(index=False), total=len(rows), desc=f"embed shard {shard}", unit="page",
                    mininterval=2):
        start = time.perf_counter()
        out = embed_page(backbone, read_mask(mask_of[doc.doc_id]), settings, patch, dev)
        if out["dim"] is not None:
            width = out["dim"]
            token_parts.append(out["tokens"].astype(np.float16))
            cls_parts.append(out["cls"].astype(np.float16))
        n_tokens, n_cls = len(out["tokens"]) if out["dim"] else 0, len(out["cls"]) if out["dim"] else 0
        if n_tokens == 0:
            log.warning("%s: no foreground tokens (no window with a patch of >= %d ink pixels)", doc.path,
                        settings["t_fg"])
        entries.append({"doc_id": doc.doc_id, "n_tokens": n_tokens, "shard": shard, "offset": offset,
                        "n_windows": n_cls, "cls_offset": cls_offset})
        offset += n_tokens
        cls_offset += n_cls
        stats.append({"doc_id": doc.doc_id, "writer": doc.writer, "split": doc.split, "n_windows": out["n_windows"],
                      "n_windows_embedded": out["n_windows_embedded"], "n_tokens": n_tokens,
                      "seconds": time.perf_counter() - start})
    if width is None:
        width = token_width(settings)
    write_npy(np.concatenate(token_parts) if token_parts else np.zeros((0, width), np.float16), tokens_path)
    write_npy(np.concatenate(cls_parts) if cls_parts else np.zeros((0, width), np.float16), cls_path)
    write_parquet(pd.DataFrame(entries), shard_index_path)
    table = pd.DataFrame(stats)
    write_parquet(table, stats_path)
    return table


def token_width(settings: dict) -> int:
    from .pretrain import build_backbone

    dim = build_backbone(settings["model"]).embed_dim
    return dim * settings["layers"] if settings["fuse"] == "concat" else dim


# --------------------------------------------------------------------------------------------
# Patch path (SAGHOG): page descriptor = power-normalised sum of its patch encodings
# --------------------------------------------------------------------------------------------

def power_l2(x: np.ndarray, power: float) -> np.ndarray:
    """Signed power normalisation |x|^power * sign(x), then L2 per row (zero rows stay zero)."""
    x = np.asarray(x, np.float64)
    y = np.sign(x) * np.abs(x) ** float(power)
    norms = np.linalg.norm(y, axis=-1, keepdims=True)
    return np.where(norms > 0, y / np.where(norms > 0, norms, 1.0), 0.0)


def embed_patches_shard(patches_path, shard_index_path, encode, batch_size: int, power: float, out_vectors,
                        out_index, out_stats, index_path, shard: int, shard_size: int) -> pd.DataFrame:
    """One vector per page of a shard of the dataset index: the sum of the page's patch encodings
    (`encode`: uint8 patches [n, H, W] -> float32 [n, F]) -> signed power -> L2.

    The pages come from the dataset index (`shard_rows(index, shard, shard_size)`), their patches
    from the patch stage's shard (patches .npy + per-patch index with doc_id); a page without
    patches gets a zero row and a warning. Writes out_vectors .npy float32 [n_docs, F] (index order),
    out_index (doc_id, n_patches) and out_stats (doc_id, writer, split, n_patches, seconds); returns the stats.
    """
    rows = shard_rows(pd.read_parquet(index_path), shard, shard_size)
    patches = np.load(patches_path, mmap_mode="r")
    patch_docs = pd.read_parquet(shard_index_path, columns=["doc_id"]).doc_id.astype(str)
    if len(patch_docs) != len(patches):
        raise ValueError(f"{shard_index_path} has {len(patch_docs)} rows but {patches_path} {len(patches)} patches")
    positions = patch_docs.groupby(patch_docs, sort=False).indices
    docs = [str(d) for d in rows.doc_id]
    writers, splits = rows.writer.tolist(), rows.split.tolist()
    strangers = sorted(set(positions) - set(docs))
    if strangers:
        raise ValueError(f"{shard_index_path}: patches of {len(strangers)} document(s) not in shard {shard} of "
                         f"{index_path}, e.g. {strangers[0]!r} (patch and index shards do not match)")
    width = getattr(encode, "dim", None)
    if width is None:  # the width of the encoding of one blank patch
        width = np.asarray(encode(np.zeros((1, *patches.shape[1:]), np.uint8))).shape[1]
    width = int(width)
    batch_size = max(int(batch_size), 1)
    vectors = np.zeros((len(docs), width), np.float32)
    stats = []
    for i, doc in enumerate(tqdm(docs, desc=f"embed patches shard {shard}", unit="page", mininterval=2)):
        start = time.perf_counter()
        where = np.sort(np.asarray(positions.get(doc, []), np.int64))
        total = np.zeros(width, np.float64)
        for b in range(0, len(where), batch_size):
            chunk = np.asarray(patches[where[b:b + batch_size]])
            total += np.asarray(encode(chunk), np.float64).sum(axis=0)
        if len(where) == 0:
            log.warning("%s: no patches; its descriptor is a zero vector", doc)
        else:
            vectors[i] = power_l2(total[None], power)[0]
        stats.append({"doc_id": doc, "writer": writers[i], "split": splits[i], "n_patches": int(len(where)),
                      "seconds": time.perf_counter() - start})
    write_npy(vectors, out_vectors)
    table = pd.DataFrame(stats, columns=["doc_id", "writer", "split", "n_patches", "seconds"])
    write_parquet(table[["doc_id", "n_patches"]], out_index)
    write_parquet(table, out_stats)
    return table
