"""AttMask self-supervised pretraining of a timm ViT on binarized handwriting (Raven et al.).

iBOT/DINO-style student-teacher training with attention-guided masking:

- Student = timm ViT backbone (in_chans=1, ink = 1.0) + projection head; teacher = same
  architecture, exponential moving average (EMA) of the student, never trained by gradients.
- Loss = [CLS] self-distillation (DINO: teacher softmax of the two global crops vs. student
  log-softmax of every other crop) + masked-patch distillation (iBOT: for the patches masked in
  the student's global crop, cross-entropy against the teacher's patch distribution of the same,
  unmasked view). Teacher outputs are centred (EMA centers, momentum 0.9) and sharpened.
- Masking ("attmask_high"): with probability `mask_probability` per image, the round(ratio * N)
  patches the teacher's last-layer [CLS] attention (mean over heads) ranks highest are replaced
  by a learnable mask token in the student's input. "random" and "block" (BEiT) are baselines.

Design choices (documented here because other stages rely on them):

- Head: one shared projection MLP (Linear-GELU-Linear-GELU-Linear to a 256-d bottleneck, L2
  normalised) for [CLS] and patch tokens, followed by two separate weight-normalised last layers
  (`out_dim` for [CLS], `patch_out_dim` for patches). This is iBOT's "non-shared head" variant.
  Last layers are weight-normalised with the norm fixed to 1 (DINO's norm_last_layer=True).
- Mask token: a learnable (1, embed_dim) parameter attached to the backbone as
  `backbone.mask_token` (so it is saved in backbone.pt and restored by `load_backbone`). It is
  spliced in right after `patch_embed`, before position embeddings (see `forward_tokens`).
- The student's patch head runs only on the masked patches (the only ones the loss uses); the
  teacher's runs on all patches (needed for the patch center).
- Patch loss per view = mean over images of (mean CE over that image's masked patches), images
  without masked patches contributing 0 (as in iBOT); total = loss_cls + loss_patch.
- lr = settings.lr * (batch_size * world_size) / 256 (batch_size is per process, as in the paper).
- Gradient clipping by the global gradient norm (torch.nn.utils.clip_grad_norm_).
- Determinism: every random decision is a function of (seed, epoch, sample index) or
  (seed, iteration, rank), and global RNGs are reseeded at every epoch start, so a run resumed
  from `checkpoint.pt` ends with the same weights as an uninterrupted one (CPU, fixed seed).

Input convention shared with the embedding stage: `to_input` (ink = 1.0, paper = 0.0, float32,
shape [1, H, W]), `build_backbone`, `load_backbone`, `forward_tokens`, `resolve_device`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError
from .storage import atomic_path, write_parquet

log = logging.getLogger("writer_retrieval")

REQUIRED_SETTINGS = (
    "method", "model", "epochs", "batch_size", "lr", "min_lr", "warmup_epochs", "weight_decay",
    "weight_decay_end", "clip_grad", "momentum_teacher", "teacher_temp", "student_temp",
    "patch_teacher_temp", "out_dim", "patch_out_dim", "masking", "mask_ratio", "mask_probability",
    "global_size", "local_size", "n_local_crops", "global_scale", "local_scale", "window",
    "max_windows", "seed", "num_workers", "amp",
)
# Optional settings and their defaults (not part of the shared config contract).
OPTIONAL_SETTINGS = {
    "checkpoint_every": 1,
    "head_hidden_dim": 2048,
    "head_bottleneck_dim": 256,
    "head_layers": 3,
    "freeze_last_layer": 0,           # epochs during which the heads' last layers are frozen
    "warmup_teacher_temp": None,      # None = no teacher temperature warm-up
    "warmup_teacher_temp_epochs": 0,
    "center_momentum": 0.9,
    "min_ink": 0.01,                  # windows with a smaller ink fraction are skipped
    "window_overlap": 0.5,
    "blur_sigma": [0.1, 1.0],
    "blur_p_global": 0.5,
    "blur_p_local": 0.5,
    "erode_p": 0.5,
    "dilate_p": 0.5,
}
MASKING_MODES = ("attmask_high", "random", "block")
CHECKPOINT = "checkpoint.pt"
BACKBONE = "backbone.pt"
LOG_TABLE = "log.parquet"


# --------------------------------------------------------------------------------------------
# Input convention, devices, backbone
# --------------------------------------------------------------------------------------------

def to_input(window: np.ndarray) -> torch.Tensor:
    """A window (bool ink mask, or float with ink = 1.0) as the network input [1, H, W] float32."""
    arr = np.asarray(window)
    if arr.ndim != 2:
        raise ValueError(f"to_input expects a 2-D window, got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu' / 'cuda' / 'cuda:N' explicit."""
    if isinstance(device, torch.device):
        device = str(device)
    device = (device or "auto").strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine "
                             "(no GPU or a CPU-only torch build); use device 'cpu' or 'auto'")
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) visible")
        return dev
    raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'")


def build_backbone(model: dict, seed: int | None = None) -> nn.Module:
    """A timm VisionTransformer with in_chans=1, no classifier, dynamic image size, no weights
    downloaded; plus a learnable `mask_token` (1, embed_dim) used by masked image modelling."""
    import timm

    for key in ("arch", "img_size", "patch_size"):
        if key not in model:
            raise InputError(f"model settings: missing key '{key}' (have {sorted(model)})")
    kwargs = dict(pretrained=False, num_classes=0, in_chans=1, img_size=model["img_size"],
                  patch_size=model["patch_size"], drop_path_rate=model.get("drop_path_rate", 0.0),
                  dynamic_img_size=True)
    for key in ("embed_dim", "depth", "num_heads"):
        if model.get(key) is not None:
            kwargs[key] = model[key]
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        net = timm.create_model(model["arch"], **kwargs)
    if getattr(net, "cls_token", None) is None or not hasattr(net, "blocks"):
        raise InputError(f"model arch {model['arch']!r}: AttMask needs a ViT with a [CLS] token")
    net.mask_token = nn.Parameter(torch.zeros(1, net.embed_dim))
    return net


def load_backbone(path, model: dict, device="cpu") -> nn.Module:
    """The student backbone saved by `pretrain` (backbone.pt), in eval mode on `device`."""
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    net = build_backbone(model)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.to(dev).eval()


# --------------------------------------------------------------------------------------------
# Token forward with masking, last-layer [CLS] attention
# --------------------------------------------------------------------------------------------

def _cls_attention(block: nn.Module, x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """[CLS] -> patch attention of `block` for block input x [B, T, C], mean over heads: [B, N]."""
    attn = block.attn
    if not (hasattr(attn, "qkv") and hasattr(attn, "num_heads") and hasattr(attn, "scale")):
        raise TypeError(f"cannot read attention from {type(attn).__name__}: needs a fused qkv projection")
    y = block.norm1(x)
    B, T, _ = y.shape
    qkv = attn.qkv(y).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = attn.q_norm(q), attn.k_norm(k)
    with torch.autocast(device_type=x.device.type, enabled=False):  # rank in float32, not bf16
        logits = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)  # [B, heads, 1, T]
        weights = logits.softmax(dim=-1)[:, :, 0, num_prefix:]
    return weights.mean(dim=1)


def _forward(backbone, img, mask=None, return_layers: int = 1, with_attention: bool = False,
             mask_token: torch.Tensor | None = None):
    """Shared forward: tokens of the last `return_layers` blocks (each through the final norm,
    [CLS] + patch tokens, register tokens dropped) and optionally the last block's [CLS] attention."""
    return_layers = int(return_layers)
    n_blocks = len(backbone.blocks)
    if not 1 <= return_layers <= n_blocks:
        raise ValueError(f"return_layers must be in 1..{n_blocks}, got {return_layers}")
    npt = int(getattr(backbone, "num_prefix_tokens", 1))
    x = backbone.patch_embed(img)  # [B, H, W, C] with dynamic_img_size, else [B, N, C]
    if mask is not None:
        token = mask_token if mask_token is not None else getattr(backbone, "mask_token", None)
        if token is None:
            raise ValueError("a mask was given but the backbone has no mask_token (use build_backbone)")
        m = mask.to(device=x.device, dtype=torch.bool).reshape(x.shape[:-1])
        x = torch.where(m.unsqueeze(-1), token.to(x.dtype).reshape(*([1] * (x.dim() - 1)), -1), x)
    x = backbone._pos_embed(x)
    x = backbone.patch_drop(x)
    x = backbone.norm_pre(x)
    outs = []
    attention = None
    first_kept = n_blocks - return_layers
    for i, blk in enumerate(backbone.blocks):
        if with_attention and i == n_blocks - 1:
            attention = _cls_attention(blk, x, npt)
        x = blk(x)
        if i >= first_kept:
            outs.append(x)
    outs = [backbone.norm(o) for o in outs]
    if npt > 1:
        outs = [torch.cat([o[:, :1], o[:, npt:]], dim=1) for o in outs]
    return outs, attention


def forward_tokens(backbone, img: torch.Tensor, mask: torch.Tensor | None = None, return_layers: int = 1):
    """Final-norm tokens of a timm ViT: [B, 1 + N, D] with [CLS] first (register tokens dropped).

    mask (bool [B, N] or [B, h, w], optional): patches to replace by `backbone.mask_token` after
    the patch embedding (before position embeddings). With return_layers = k > 1, returns a list
    of the last k blocks' outputs (earliest first), each passed through `backbone.norm`.
    """
    outs, _ = _forward(backbone, img, mask=mask, return_layers=return_layers)
    return outs[0] if return_layers == 1 else outs


def last_block_cls_attention(backbone, img: torch.Tensor) -> torch.Tensor:
    """[CLS] -> patch attention of the last block, averaged over heads: [B, N] (rows sum <= 1)."""
    _, attention = _forward(backbone, img, with_attention=True)
    return attention


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------

def n_masked(n_patches: int, ratio: float) -> int:
    """round(ratio * N), halves rounded up, clipped to 0..N."""
    return int(min(max(math.floor(float(ratio) * n_patches + 0.5), 0), n_patches))


def attention_mask(cls_attention: torch.Tensor, ratio: float) -> torch.Tensor:
    """AttMask-High: mask the round(ratio * N) most-attended patches of each row. Bool [B, N]."""
    att = cls_attention.detach()
    B, N = att.shape
    k = n_masked(N, ratio)
    mask = torch.zeros(B, N, dtype=torch.bool, device=att.device)
    if k > 0:
        idx = att.float().topk(k, dim=1).indices
        mask.scatter_(1, idx, True)
    return mask


def random_mask(batch: int, n_patches: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(ratio * N) random patches per row."""
    k = n_masked(n_patches, ratio)
    mask = np.zeros((batch, n_patches), bool)
    for b in range(batch):
        mask[b, rng.choice(n_patches, size=k, replace=False)] = True
    return mask


def block_mask(batch: int, grid: tuple[int, int], ratio: float, rng: np.random.Generator,
               min_block: int = 4, aspect: float = 0.3) -> np.ndarray:
    """BEiT-style blockwise masking: random rectangles until exactly round(ratio * N) patches."""
    h, w = grid
    n = h * w
    k = n_masked(n, ratio)
    out = np.zeros((batch, n), bool)
    log_aspect = (math.log(aspect), math.log(1 / aspect))
    for b in range(batch):
        m = np.zeros((h, w), bool)
        count, attempts = 0, 0
        while count < k and attempts < 100:
            attempts += 1
            remaining = k - count
            area = rng.uniform(min(min_block, remaining), max(remaining, min_block))
            ar = math.exp(rng.uniform(*log_aspect))
            bh = int(min(max(round(math.sqrt(area * ar)), 1), h))
            bw = int(min(max(round(math.sqrt(area / ar)), 1), w))
            top = int(rng.integers(0, h - bh + 1))
            left = int(rng.integers(0, w - bw + 1))
            region = m[top:top + bh, left:left + bw]
            ys, xs = np.nonzero(~region)
            take = min(len(ys), remaining)
            region[ys[:take], xs[:take]] = True
            count += take
        if count < k:  # pathological: fill up at random
            free = np.flatnonzero(~m.ravel())
            m.ravel()[rng.choice(free, size=k - count, replace=False)] = True
        out[b] = m.ravel()
    return out


# --------------------------------------------------------------------------------------------
# Heads and the multi-crop network
# --------------------------------------------------------------------------------------------

class NormedLinear(nn.Module):
    """Weight-normalised linear layer without bias, the norm fixed to 1 (DINO's last layer)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x):
        return F.linear(x, F.normalize(self.weight, dim=1))


class AttMaskHead(nn.Module):
    """Shared projection MLP -> L2-normalised bottleneck -> separate [CLS] / patch last layers."""

    def __init__(self, in_dim, out_dim, patch_out_dim, hidden_dim=2048, bottleneck_dim=256, n_layers=3):
        super().__init__()
        n_layers = max(int(n_layers), 1)
        if n_layers == 1:
            layers = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(n_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for mod in self.mlp:
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)
        self.last_cls = NormedLinear(bottleneck_dim, out_dim)
        self.last_patch = NormedLinear(bottleneck_dim, patch_out_dim)

    def project(self, x):
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, cls_tokens, patch_tokens):
        cls_out = self.last_cls(self.project(cls_tokens))
        patch_out = self.last_patch(self.project(patch_tokens))
        return cls_out, patch_out


class MultiCropNet(nn.Module):
    """Backbone + head over global crops (optionally masked) and local crops.

    forward(globals [V*B,1,G,G], locals [L*B,1,l,l] or None, mask bool [V*B,N] or None):
    - student (mask given): cls logits of all crops [(V+L)*B, out], patch logits of the masked
      patches only [M, patch_out] (row-major order of mask.nonzero()).
    - teacher (mask None): cls logits of the globals, patch logits of all patches [V*B, N, P],
      and with with_attention=True the last block's [CLS] attention [V*B, N].
    """

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, globals_, locals_=None, mask=None, with_attention: bool = False):
        (tokens,), attention = _forward(self.backbone, globals_, mask=mask, with_attention=with_attention)
        cls_tokens = tokens[:, 0]
        patches = tokens[:, 1:]
        if mask is not None:
            patches = patches[mask.reshape(patches.shape[:2])]
        if locals_ is not None and locals_.shape[0] > 0:
            (local_tokens,), _ = _forward(self.backbone, locals_)
            cls_tokens = torch.cat([cls_tokens, local_tokens[:, 0]])
        cls_out, patch_out = self.head(cls_tokens, patches)
        return cls_out, patch_out, attention


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = m * teacher + (1 - m) * student, parameter by parameter (buffers copied)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    m = float(momentum)
    for t, s in zip(t_params, s_params):
        t.mul_(m).add_(s * (1.0 - m))
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------

def cosine_schedule(base, final, epochs, niter_per_epoch, warmup_epochs=0, warmup_start=0.0) -> np.ndarray:
    """Per-iteration values: linear warm-up from warmup_start to base, then cosine to final."""
    total = int(epochs) * int(niter_per_epoch)
    warm = min(int(round(warmup_epochs * niter_per_epoch)), total)
    warm_part = np.linspace(warmup_start, base, warm, endpoint=False) if warm > 0 else np.zeros(0)
    n = total - warm
    steps = np.arange(n)
    cos_part = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(n, 1)))
    return np.concatenate([warm_part, cos_part]).astype(np.float64)


# --------------------------------------------------------------------------------------------
# Data: windows of binarized pages and multi-crop augmentation
# --------------------------------------------------------------------------------------------

def window_positions(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering 0..length with the given stride; the last window ends at the border."""
    if length <= window:
        return [0]
    pos = list(range(0, length - window + 1, stride))
    if pos[-1] + window < length:
        pos.append(length - window)
    return pos


def _load_pages(page_masks, window: int, stride: int, min_ink: float, progress: bool):
    """Pages as packed bits (padded to >= window) and the (page, y, x) of windows with enough ink."""
    import cv2
    from tqdm.auto import tqdm

    from .imaging import read_mask

    pages, index = [], []
    skipped = 0
    for p, path in enumerate(tqdm(list(page_masks), desc="pretrain: windows", disable=not progress,
                                  unit="page")):
        ink = read_mask(path)
        H, W = ink.shape
        if H < window or W < window:
            padded = np.zeros((max(H, window), max(W, window)), bool)
            padded[:H, :W] = ink
            ink = padded
            H, W = ink.shape
        integral = cv2.integral(ink.view(np.uint8))
        need = min_ink * window * window
        for y in window_positions(H, window, stride):
            for x in window_positions(W, window, stride):
                s = (int(integral[y + window, x + window]) - int(integral[y, x + window])
                     - int(integral[y + window, x]) + int(integral[y, x]))
                if s >= need and s > 0:
                    index.append((p, y, x))
                else:
                    skipped += 1
        pages.append(np.packbits(ink, axis=1))
    return pages, np.asarray(index, np.int64).reshape(-1, 3), skipped


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) as in torchvision's RandomResizedCrop, drawn from `rng`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: centre crop with the ratio clipped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class WindowDataset(torch.utils.data.Dataset):
    """Windows cut from binarized pages; item i -> (globals [2,1,G,G], locals [L,1,l,l]) float32.

    Randomness comes from np.random.default_rng([seed, epoch, i]) so that a sample's
    augmentation does not depend on worker count, order or resumption. Call set_epoch(e).
    """

    def __init__(self, pages, index, settings: dict):
        self.pages = pages
        self.index = index
        self.s = settings
        self.window = int(settings["window"])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.index)

    def window_at(self, i: int) -> np.ndarray:
        p, y, x = (int(v) for v in self.index[i])
        w = self.window
        packed = self.pages[p]
        b0, b1 = x // 8, (x + w + 7) // 8 + 1
        bits = np.unpackbits(packed[y:y + w, b0:b1], axis=1)
        off = x - 8 * b0
        return bits[:, off:off + w]  # uint8 0/1

    def _crop(self, rng, win, size, scale, blur_p):
        import cv2

        s = self.s
        top, left, h, w = random_resized_crop_box(rng, win.shape[0], win.shape[1], scale)
        crop = np.ascontiguousarray(win[top:top + h, left:left + w])
        kernel = np.ones((3, 3), np.uint8)
        if rng.random() < s["erode_p"]:
            crop = cv2.erode(crop, kernel)
        if rng.random() < s["dilate_p"]:
            crop = cv2.dilate(crop, kernel)
        img = crop.astype(np.float32)
        interp = cv2.INTER_AREA if (h > size or w > size) else cv2.INTER_LINEAR
        img = cv2.resize(img, (size, size), interpolation=interp)
        if rng.random() < blur_p:
            sigma = rng.uniform(*s["blur_sigma"])
            img = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma)
        return to_input(np.clip(img, 0.0, 1.0))

    def __getitem__(self, i):
        s = self.s
        rng = np.random.default_rng([int(s["seed"]), self.epoch, int(i)])
        win = self.window_at(int(i))
        g = [self._crop(rng, win, int(s["global_size"]), s["global_scale"], s["blur_p_global"]) for _ in range(2)]
        loc = [self._crop(rng, win, int(s["local_size"]), s["local_scale"], s["blur_p_local"])
               for _ in range(int(s["n_local_crops"]))]
        local_t = torch.stack(loc) if loc else torch.zeros(0, 1, int(s["local_size"]), int(s["local_size"]))
        return torch.stack(g), local_t


def _worker_init(worker_id: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    seed = torch.initial_seed() % 2**32  # base seed (drawn from the per-epoch seeded RNG) + worker id
    random.seed(seed)
    np.random.seed(seed)


def epoch_subset(n: int, max_windows: int, seed: int, epoch: int) -> np.ndarray:
    """Indices of the windows used in `epoch`: all, or a seeded sample of max_windows."""
    if max_windows and 0 < max_windows < n:
        rng = np.random.default_rng([int(seed), int(epoch), 1])
        return np.sort(rng.choice(n, size=int(max_windows), replace=False))
    return np.arange(n)


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------

def _settings_with_defaults(settings: dict) -> dict:
    missing = [k for k in REQUIRED_SETTINGS if k not in settings]
    if missing:
        raise InputError(f"pretrain settings: missing key(s) {', '.join(missing)}")
    s = dict(OPTIONAL_SETTINGS)
    s.update({k: v for k, v in settings.items()})
    for k, v in OPTIONAL_SETTINGS.items():
        if s.get(k) is None:
            s[k] = v
    if s["warmup_teacher_temp"] is None:
        s["warmup_teacher_temp"] = s["teacher_temp"]
    if s["method"] != "attmask":
        raise InputError(f"pretrain settings: method {s['method']!r} is not supported (only 'attmask')")
    if s["masking"] not in MASKING_MODES:
        raise InputError(f"pretrain settings: masking {s['masking']!r} not in {', '.join(MASKING_MODES)}")
    if s["amp"] not in ("bf16", "fp16", "none"):
        raise InputError(f"pretrain settings: amp {s['amp']!r} not in bf16, fp16, none")
    p = int(s["model"]["patch_size"])
    for key in ("global_size", "local_size"):
        if int(s[key]) % p:
            raise InputError(f"pretrain settings: {key} = {s[key]} is not a multiple of patch_size {p}")
    if int(s["epochs"]) < 1 or int(s["batch_size"]) < 1:
        raise InputError("pretrain settings: epochs and batch_size must be >= 1")
    if int(s["checkpoint_every"]) < 1:
        s["checkpoint_every"] = 1
    return s


def _param_groups(module: nn.Module):
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or name.endswith(".bias") or leaf in ("pos_embed", "cls_token", "mask_token", "reg_token"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class AttMaskTrainer:
    """Student, teacher, optimiser, centers and one training step (no data handling)."""

    def __init__(self, settings: dict, device: torch.device, niter_per_epoch: int, world_size: int = 1,
                 rank: int = 0, ddp: bool = False):
        s = self.s = _settings_with_defaults(settings)
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.niter_per_epoch = int(niter_per_epoch)
        backbone = build_backbone(s["model"], seed=int(s["seed"]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s["seed"]) + 1)
            head = AttMaskHead(backbone.embed_dim, int(s["out_dim"]), int(s["patch_out_dim"]),
                               int(s["head_hidden_dim"]), int(s["head_bottleneck_dim"]), int(s["head_layers"]))
        self.student = MultiCropNet(backbone, head).to(device)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student_ddp = self.student
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.student_ddp = DistributedDataParallel(self.student, device_ids=ids)
        self.patch_size = int(s["model"]["patch_size"])
        self.center = torch.zeros(1, int(s["out_dim"]), device=device)
        self.patch_center = torch.zeros(1, int(s["patch_out_dim"]), device=device)
        self.optimizer = torch.optim.AdamW(_param_groups(self.student), lr=0.0, weight_decay=0.0)
        amp = s["amp"] if device.type == "cuda" else "none"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=(amp == "fp16"))
        epochs = int(s["epochs"])
        n = self.niter_per_epoch
        lr = float(s["lr"]) * int(s["batch_size"]) * world_size / 256.0
        self.lr_schedule = cosine_schedule(lr, float(s["min_lr"]), epochs, n, float(s["warmup_epochs"]))
        self.wd_schedule = cosine_schedule(float(s["weight_decay"]), float(s["weight_decay_end"]), epochs, n)
        self.momentum_schedule = cosine_schedule(float(s["momentum_teacher"]), 1.0, epochs, n)
        warm_t = int(round(float(s["warmup_teacher_temp_epochs"]) * n))
        total = epochs * n
        self.teacher_temp_schedule = np.concatenate([
            np.linspace(float(s["warmup_teacher_temp"]), float(s["teacher_temp"]), min(warm_t, total)),
            np.full(max(total - warm_t, 0), float(s["teacher_temp"]))])

    # -- masks ------------------------------------------------------------------------------
    def make_mask(self, n_images: int, grid: tuple[int, int], attention: torch.Tensor | None, it: int) -> torch.Tensor:
        s = self.s
        rng = np.random.default_rng([int(s["seed"]), int(it), int(self.rank), 2])
        n = grid[0] * grid[1]
        apply = rng.random(n_images) < float(s["mask_probability"])
        if s["masking"] == "attmask_high":
            if attention is None:
                raise ValueError("attmask_high needs the teacher's attention")
            mask = attention_mask(attention, float(s["mask_ratio"]))
        elif s["masking"] == "random":
            mask = torch.from_numpy(random_mask(n_images, n, float(s["mask_ratio"]), rng))
        else:
            mask = torch.from_numpy(block_mask(n_images, grid, float(s["mask_ratio"]), rng))
        mask = mask.to(self.device) & torch.from_numpy(apply).to(self.device)[:, None]
        return mask

    # -- loss -------------------------------------------------------------------------------
    def loss(self, s_cls, s_patch, t_cls, t_patch, mask, n_global: int, it: int):
        s = self.s
        st = float(s["student_temp"])
        tt = float(self.teacher_temp_schedule[min(it, len(self.teacher_temp_schedule) - 1)])
        ptt = float(s["patch_teacher_temp"])
        s_cls, s_patch, t_cls, t_patch = s_cls.float(), s_patch.float(), t_cls.float(), t_patch.float()
        t_prob = F.softmax((t_cls - self.center) / tt, dim=-1).chunk(n_global)
        s_logp = F.log_softmax(s_cls / st, dim=-1)
        B = t_cls.shape[0] // n_global
        s_views = s_logp.split(B)
        total, terms = 0.0, 0
        for iq, tq in enumerate(t_prob):
            for v, sv in enumerate(s_views):
                if v == iq:
                    continue
                total = total + (-(tq * sv).sum(-1)).mean()
                terms += 1
        loss_cls = total / max(terms, 1)
        # Masked-patch loss on the same (global) view.
        tp = F.softmax((t_patch - self.patch_center) / ptt, dim=-1)[mask]  # [M, P]
        ce = -(tp * F.log_softmax(s_patch / st, dim=-1)).sum(-1)       # [M]
        counts = mask.sum(1).clamp(min=1).float()                       # [V*B]
        img = mask.nonzero()[:, 0]
        loss_patch = (ce / counts[img]).sum() / mask.shape[0]
        return loss_cls, loss_patch

    @torch.no_grad()
    def update_centers(self, t_cls, t_patch):
        m = float(self.s["center_momentum"])
        c = t_cls.float().sum(0, keepdim=True)
        pc = t_patch.float().mean(1).sum(0, keepdim=True)
        n = torch.tensor([float(t_cls.shape[0])], device=self.device)
        if self.world_size > 1:
            import torch.distributed as dist

            for t in (c, pc, n):
                dist.all_reduce(t)
        self.center.mul_(m).add_(c / n * (1 - m))
        self.patch_center.mul_(m).add_(pc / n * (1 - m))

    # -- one step ---------------------------------------------------------------------------
    def step(self, globals_: torch.Tensor, locals_: torch.Tensor, it: int, epoch: int) -> dict:
        """globals_ [B, 2, 1, G, G], locals_ [B, L, 1, l, l] as produced by WindowDataset."""
        s = self.s
        it_c = min(it, len(self.lr_schedule) - 1)
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr_schedule[it_c])
            if i == 0:
                group["weight_decay"] = float(self.wd_schedule[it_c])
        dev = self.device
        nb = dev.type == "cuda"
        B, V = globals_.shape[:2]
        g = globals_.to(dev, non_blocking=nb).transpose(0, 1).reshape(V * B, *globals_.shape[2:])
        loc = None
        if locals_ is not None and locals_.shape[1] > 0:
            L = locals_.shape[1]
            loc = locals_.to(dev, non_blocking=nb).transpose(0, 1).reshape(L * B, *locals_.shape[2:])
        grid = (g.shape[-2] // self.patch_size, g.shape[-1] // self.patch_size)
        amp_ctx = (torch.autocast(device_type=dev.type, dtype=self.autocast_dtype)
                   if self.autocast_dtype is not None else contextlib.nullcontext())
        with amp_ctx:
            with torch.no_grad():
                t_cls, t_patch, t_att = self.teacher(g, with_attention=(s["masking"] == "attmask_high"))
            mask = self.make_mask(V * B, grid, t_att, it)
            s_cls, s_patch, _ = self.student_ddp(g, loc, mask)
        loss_cls, loss_patch = self.loss(s_cls, s_patch, t_cls, t_patch, mask, V, it)
        loss = loss_cls + loss_patch
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain: loss is {loss.item()} at iteration {it}; "
                                     "lower lr or use amp 'bf16'/'none'")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        clip = float(s["clip_grad"])
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), clip)
        if epoch < int(s["freeze_last_layer"]):
            for p in (self.student.head.last_cls.weight, self.student.head.last_patch.weight):
                p.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        m = float(self.momentum_schedule[it_c])
        ema_update(self.teacher, self.student, m)
        self.update_centers(t_cls, t_patch)
        return {"loss": loss.item(), "loss_cls": loss_cls.item(), "loss_patch": loss_patch.item(),
                "lr": float(self.lr_schedule[it_c]), "weight_decay": float(self.wd_schedule[it_c]),
                "momentum": m, "n_masked": int(mask.sum().item())}

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "center": self.center.cpu(), "patch_center": self.patch_center.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.center.copy_(state["center"].to(self.device))
        self.patch_center.copy_(state["patch_center"].to(self.device))


# --------------------------------------------------------------------------------------------
# Distributed helpers, RNG
# --------------------------------------------------------------------------------------------

def _dist_env() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    s = (int(seed) * 1_000_003 + int(epoch) * 7919 + int(rank) * 104_729) % 2**32
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception:  # different GPU count on resume: per-epoch reseeding covers it
            pass


def _comparable(settings: dict) -> dict:
    ignore = {"num_workers", "checkpoint_every", "amp"}
    return {k: v for k, v in settings.items() if k not in ignore}


# --------------------------------------------------------------------------------------------
# Training entry point
# --------------------------------------------------------------------------------------------

def pretrain(page_masks: list[str], settings: dict, out_dir, *, device: str = "auto", progress: bool = True,
             stop_after_epochs: int | None = None) -> dict:
    """Train AttMask on windows of binarized TRAIN pages; resume from out_dir/checkpoint.pt.

    Writes (rank 0 only) out_dir/checkpoint.pt every `checkpoint_every` epochs, and at the end
    out_dir/backbone.pt (student backbone state_dict) and out_dir/log.parquet (one row per epoch).
    `stop_after_epochs` is a test hook: return right after that epoch's checkpoint, as if killed.
    """
    from tqdm.auto import tqdm

    s = _settings_with_defaults(settings)
    out_dir = Path(out_dir)
    if not page_masks:
        raise InputError("pretrain: no training page masks given")

    started_dist = False
    world_size, rank = 1, 0
    dev = resolve_device(device)
    import torch.distributed as dist

    if _dist_env() or (dist.is_available() and dist.is_initialized()):
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if dev.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
            started_dist = True
        world_size, rank = dist.get_world_size(), dist.get_rank()
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    use_ddp = world_size > 1 or started_dist or _dist_env()
    is_main = rank == 0
    try:
        window = int(s["window"])
        stride = max(int(round(window * (1 - float(s["window_overlap"])))), 1)
        pages, index, skipped = _load_pages(page_masks, window, stride, float(s["min_ink"]), progress and is_main)
        if len(index) == 0:
            raise InputError(f"pretrain: no {window}x{window} window with >= {s['min_ink']:.0%} ink "
                             f"in {len(page_masks)} page mask(s)")
        dataset = WindowDataset(pages, index, s)
        per_epoch = len(epoch_subset(len(index), int(s["max_windows"]), int(s["seed"]), 0))
        per_rank = math.ceil(per_epoch / world_size)
        bs = int(s["batch_size"])
        drop_last = per_rank >= bs
        niter = per_rank // bs if drop_last else 1
        if not drop_last:
            log.warning("pretrain: only %d windows per process for batch size %d: one short batch per epoch",
                        per_rank, bs)
        if is_main:
            log.info("pretrain: %d pages, %d windows (%d skipped with < %.1f%% ink), %d per epoch, "
                     "%d iterations/epoch, world size %d, device %s", len(page_masks), len(index), skipped,
                     100 * float(s["min_ink"]), per_epoch, niter, world_size, dev)
        trainer = AttMaskTrainer(s, dev, niter, world_size=world_size, rank=rank, ddp=use_ddp)

        start_epoch, rows = 0, []
        ckpt_path = out_dir / CHECKPOINT
        if ckpt_path.exists():
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if _comparable(ckpt.get("settings", {})) != _comparable(s):
                log.warning("pretrain: settings differ from those of %s; resuming anyway", ckpt_path)
            trainer.load_state_dict(ckpt["trainer"])
            start_epoch = int(ckpt["epoch"])
            rows = list(ckpt.get("log", []))
            rng_states = ckpt.get("rng", {})
            if str(rank) in rng_states:
                _set_rng_state(rng_states[str(rank)])
            if is_main:
                log.info("pretrain: resuming from %s after epoch %d", ckpt_path, start_epoch)
            del ckpt

        epochs = int(s["epochs"])
        for epoch in range(start_epoch, epochs):
            _seed_epoch(int(s["seed"]), epoch, rank)
            dataset.set_epoch(epoch)
            subset = torch.utils.data.Subset(dataset, epoch_subset(len(index), int(s["max_windows"]),
                                                                   int(s["seed"]), epoch).tolist())
            sampler = torch.utils.data.distributed.DistributedSampler(
                subset, num_replicas=world_size, rank=rank, shuffle=True, seed=int(s["seed"]), drop_last=False)
            sampler.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                subset, batch_size=bs, sampler=sampler, num_workers=int(s["num_workers"]),
                drop_last=drop_last, pin_memory=(dev.type == "cuda"), worker_init_fn=_worker_init,
                persistent_workers=False,
                # forked workers deadlock once the parent's OpenMP/BLAS thread pools are running
                multiprocessing_context="forkserver" if int(s["num_workers"]) > 0 else None)
            trainer.student.train()
            trainer.teacher.eval()  # the teacher never uses drop path
            t0 = time.perf_counter()
            sums = {"loss": 0.0, "loss_cls": 0.0, "loss_patch": 0.0}
            count = 0
            n_images = 0
            bar = tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{epochs}", disable=not (progress and is_main),
                       leave=False, unit="it")
            last = {}
            for i, (g, loc) in enumerate(bar):
                it = epoch * niter + i
                last = trainer.step(g, loc, it, epoch)
                for k in sums:
                    sums[k] += last[k]
                count += 1
                n_images += g.shape[0] * world_size
                if progress and is_main:
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
            bar.close()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
            means = {k: v / max(count, 1) for k, v in sums.items()}
            if world_size > 1:
                t = torch.tensor([means["loss"], means["loss_cls"], means["loss_patch"]], device=dev)
                dist.all_reduce(t)
                t /= world_size
                means = dict(zip(("loss", "loss_cls", "loss_patch"), t.tolist()))
            row = {"epoch": epoch + 1, **means, "lr": last.get("lr", float("nan")),
                   "weight_decay": last.get("weight_decay", float("nan")),
                   "momentum": last.get("momentum", float("nan")), "seconds": seconds,
                   "images_per_second": n_images / seconds if seconds > 0 else float("nan")}
            rows.append(row)
            if is_main:
                log.info("pretrain epoch %d/%d: loss %.4f (cls %.4f, patch %.4f), lr %.2e, %.1f s, %.1f images/s",
                         epoch + 1, epochs, row["loss"], row["loss_cls"], row["loss_patch"], row["lr"],
                         seconds, row["images_per_second"])
            done = epoch + 1
            if done % int(s["checkpoint_every"]) == 0 or done == epochs or done == stop_after_epochs:
                _save_checkpoint(trainer, s, done, rows, ckpt_path, world_size, rank, is_main, dev)
            if stop_after_epochs is not None and done >= stop_after_epochs and done < epochs:
                return {"epochs": done, "stopped": True}

        if is_main:
            with atomic_path(out_dir / BACKBONE, ".pt") as tmp:
                torch.save(trainer.student.backbone.state_dict(), tmp)
            import pandas as pd

            write_parquet(pd.DataFrame(rows, columns=["epoch", "loss", "loss_cls", "loss_patch", "lr",
                                                      "weight_decay", "momentum", "seconds",
                                                      "images_per_second"]), out_dir / LOG_TABLE)
        if use_ddp:
            dist.barrier()
        final = rows[-1] if rows else {}
        return {"epochs": epochs, "loss": final.get("loss"), "loss_cls": final.get("loss_cls"),
                "loss_patch": final.get("loss_patch"), "seconds": float(sum(r["seconds"] for r in rows)),
                "images_per_second": final.get("images_per_second"),
                "n_windows": int(len(index)), "windows_per_epoch": int(per_epoch), "device": str(dev),
                "world_size": world_size, "resumed_from_epoch": start_epoch}
    finally:
        if started_dist:
            dist.destroy_process_group()


def _save_checkpoint(trainer, s, epoch, rows, path, world_size, rank, is_main, dev):
    """All ranks' RNG states are gathered; rank 0 writes the file atomically."""
    import torch.distributed as dist

    states = {str(rank): _rng_state()}
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, states)
        states = {k: v for d in gathered for k, v in d.items()}
    if is_main:
        ckpt = {"trainer": trainer.state_dict(), "epoch": int(epoch), "settings": s, "log": rows,
                "rng": states, "format": 1}
        with atomic_path(path, ".pt") as tmp:
            torch.save(ckpt, tmp)
    if world_size > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------------
# Command line (torchrun -m writer_retrieval.pretrain ...)
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m writer_retrieval.pretrain",
                                     description="AttMask self-supervised pretraining of a ViT on binarized pages")
    parser.add_argument("--masks-list", required=True, help="text file, one page-mask path per line")
    parser.add_argument("--settings", required=True, help="JSON file with the pretraining settings")
    parser.add_argument("--out", required=True, help="output folder (checkpoint.pt, backbone.pt, log.parquet)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--log", default=None, help="log file (rank 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from .logs import stage_logging

    rank = int(os.environ.get("RANK", "0"))
    with stage_logging(args.log if rank == 0 else None, "pretrain") as logger:
        if rank != 0:
            logger.setLevel(logging.WARNING)
        paths = [ln.strip() for ln in Path(args.masks_list).read_text().splitlines() if ln.strip()]
        settings = json.loads(Path(args.settings).read_text())
        summary = pretrain(paths, settings, args.out, device=args.device, progress=not args.no_progress)
        if rank == 0:
            logger.info("pretrain done: %s", json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
