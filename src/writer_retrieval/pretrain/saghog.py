"""SAGHOG: a masked autoencoder that predicts the HOG of masked patches (Peer et al. 2024).

Input: 32 x 32 binarized patches at SIFT keypoints (ink = 1.0, background = 0.0, [B, 1, 32, 32]).
The patch is cut into 4 x 4 ViT tokens (64 tokens). 75 % of the tokens are masked per sample
(MAE random masking); the encoder sees the visible tokens plus [CLS]; a light decoder gets the
encoded visible tokens and a learnable mask token at the masked positions and predicts, for
every token, the HOG vector of that token's 4 x 4 cell. Loss: MSE on the masked tokens only.

HOG target (`hog_targets`): Sobel gradients (replicate padding, so the patch border makes no
edge), magnitude, UNSIGNED orientation theta = atan2(d/d row, d/d column) mod 180 degrees in
array coordinates (rows grow downwards, as in skimage). Bin b is centred on b * 180 / bins
degrees: bin 0 = 0 degrees = a horizontal gradient (a VERTICAL edge); with 9 bins, a
horizontal edge (gradient 90 degrees) splits equally between bins 4 (80) and 5 (100); a
gradient at 45 degrees (an edge along the anti-diagonal "/", e.g. ink where row + column is
small) votes 0.75 into bin 2 (40) and 0.25 into bin 3 (60). Votes are magnitude-weighted and
linearly interpolated between the two nearest bin centres, wrapping around 180 = 0. Votes are
summed per cell (row-major cells = the ViT's token order), each cell is L2-normalised; a cell
without gradient stays all zeros.

The encoder is a timm VisionTransformer built directly (the `arch` key of the model settings
is ignored): img_size / patch_size / embed_dim / depth / num_heads / mlp_ratio from the
settings, in_chans 1, [CLS] token, no classifier, FIXED 2-D sin-cos position embeddings stored
in its (frozen) `pos_embed` ([CLS] position = zeros), so timm's `forward_features` is the
unmasked inference forward. The stage exports only the encoder's state_dict (backbone.pt).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..devices import resolve_device
from ..errors import InputError
from ..vit import load_checked
from .loop import NetTrainer, seeded_generator, train

log = logging.getLogger("writer_retrieval")

MODEL_DEFAULTS = {"arch": "vit_small_patch16_224", "img_size": 32, "patch_size": 4, "embed_dim": 512, "depth": 8,
                  "num_heads": 8, "mlp_ratio": 4.0, "decoder_dim": 256, "decoder_depth": 1, "decoder_heads": 8}
DEFAULTS = {"method": "saghog", "epochs": 200, "batch_size": 256, "lr": 8e-4, "min_lr": 8e-6, "warmup_epochs": 10,
            "weight_decay": 0.05, "weight_decay_end": 0.05, "clip_grad": 0.0, "mask_ratio": 0.75, "hog_bins": 9,
            "max_patches": 0, "seed": 0, "num_workers": 0, "amp": "bf16", "checkpoint_every": 1}


# --------------------------------------------------------------------------------------------
# HOG targets
# --------------------------------------------------------------------------------------------

def hog_targets(patches: torch.Tensor, cell: int = 4, bins: int = 9, eps: float = 1e-6) -> torch.Tensor:
    """HOG per cell of a batch of patches [B, 1, H, W] (or [B, H, W]) -> [B, (H//cell)*(W//cell), bins].

    See the module docstring for the orientation and bin convention (bin 0 centred on 0 degrees =
    vertical edge). Computed in float32 on the patches' device, without autocast.
    """
    x = patches
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"hog_targets expects [B, 1, H, W], got {tuple(patches.shape)}")
    B, _, H, W = x.shape
    if H % cell or W % cell:
        raise ValueError(f"hog_targets: patch {H}x{W} is not a multiple of the cell size {cell}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
        kernels = torch.stack([sobel_x, sobel_x.t()])[:, None]  # [2, 1, 3, 3]: d/d column, d/d row
        g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels)
        gx, gy = g[:, 0], g[:, 1]
        magnitude = torch.sqrt(gx * gx + gy * gy)
        theta = torch.remainder(torch.atan2(gy, gx), math.pi)  # [0, pi)
        pos = theta / (math.pi / bins)
        lower = torch.floor(pos)
        frac = pos - lower
        lo = lower.long().remainder(bins)
        hi = (lo + 1).remainder(bins)
        hist = torch.zeros(B, bins, H, W, device=x.device, dtype=torch.float32)
        hist.scatter_add_(1, lo[:, None], (magnitude * (1.0 - frac))[:, None])
        hist.scatter_add_(1, hi[:, None], (magnitude * frac)[:, None])
        h, w = H // cell, W // cell
        cells = hist.reshape(B, bins, h, cell, w, cell).sum(dim=(3, 5))
        cells = cells.permute(0, 2, 3, 1).reshape(B, h * w, bins)
        return F.normalize(cells, dim=-1, eps=eps)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked tokens only (mean over bins, then over masked tokens)."""
    per_token = ((pred.float() - target.float()) ** 2).mean(dim=-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def sincos_pos_embed(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings [1, (1 +) grid_h * grid_w, dim], tokens row-major;
    the first dim/2 channels encode the row, the last dim/2 the column; [CLS] gets zeros."""
    if dim % 4:
        raise InputError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angle = coord[:, None] * omega[None]
        parts += [torch.sin(angle), torch.cos(angle)]
    emb = torch.cat(parts, dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb])
    return emb.float()[None]


def model_with_defaults(model: dict) -> dict:
    m = {**MODEL_DEFAULTS, **(model or {})}
    if int(m["img_size"]) % int(m["patch_size"]):
        raise InputError(f"saghog model: img_size {m['img_size']} is not a multiple of patch_size {m['patch_size']}")
    for width, heads in (("embed_dim", "num_heads"), ("decoder_dim", "decoder_heads")):
        if int(m[width]) % int(m[heads]):
            raise InputError(f"saghog model: {width} {m[width]} is not divisible by {heads} {m[heads]}")
        if int(m[width]) % 4:
            raise InputError(f"saghog model: {width} {m[width]} must be a multiple of 4 (sin-cos positions)")
    return m


def build_encoder(model: dict, seed: int | None = None) -> nn.Module:
    """The SAGHOG encoder: a timm VisionTransformer (in_chans 1, [CLS], no classifier, frozen
    sin-cos `pos_embed`). `model["arch"]` is ignored; the sizes come from the other keys."""
    from timm.models.vision_transformer import VisionTransformer

    m = model_with_defaults(model)
    img, patch = int(m["img_size"]), int(m["patch_size"])
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        net = VisionTransformer(img_size=img, patch_size=patch, in_chans=1, num_classes=0, global_pool="token",
                                embed_dim=int(m["embed_dim"]), depth=int(m["depth"]), num_heads=int(m["num_heads"]),
                                mlp_ratio=float(m["mlp_ratio"]), qkv_bias=True, class_token=True,
                                no_embed_class=False, pos_embed="learn")
    grid = img // patch
    with torch.no_grad():
        net.pos_embed.copy_(sincos_pos_embed(net.embed_dim, grid, grid, cls_token=True))
    net.pos_embed.requires_grad_(False)
    return net


def load_encoder(path, model: dict, device="cpu") -> nn.Module:
    """The encoder saved by `pretrain_saghog` (backbone.pt), in eval mode on `device`."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    net = load_checked(build_encoder(model), path)
    net.pos_embed.requires_grad_(False)
    return net.to(dev).eval()


def n_masked(n_tokens: int, ratio: float) -> int:
    """Masked tokens per sample: round(ratio * N), at least 1 and at most N - 1."""
    return min(max(int(math.floor(ratio * n_tokens + 0.5)), 1), n_tokens - 1)


def random_masking(batch: int, n_tokens: int, ratio: float, generator: torch.Generator | None,
                   device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE masking: (ids_keep [B, K] visible tokens in shuffled order, ids_restore [B, N], mask [B, N]
    bool True = masked). The noise is drawn on the CPU from `generator`, so it is device-independent."""
    keep = n_tokens - n_masked(n_tokens, ratio)
    noise = torch.rand(batch, n_tokens, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, n_tokens, dtype=torch.bool)
    mask[:, :keep] = False
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :keep].to(device), ids_restore.to(device), mask.to(device)


class SaghogMAE(nn.Module):
    """Encoder (see build_encoder) + MAE decoder predicting `bins` HOG values per token."""

    def __init__(self, model: dict, bins: int = 9, seed: int | None = None):
        super().__init__()
        from timm.models.vision_transformer import Block

        m = model_with_defaults(model)
        self.encoder = build_encoder(m, seed=seed)
        self.patch_size = int(m["patch_size"])
        grid = int(m["img_size"]) // self.patch_size
        self.n_tokens = grid * grid
        dim, ddim = self.encoder.embed_dim, int(m["decoder_dim"])
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(int(seed) + 1)
            self.decoder_embed = nn.Linear(dim, ddim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
            self.decoder_blocks = nn.ModuleList([
                Block(ddim, int(m["decoder_heads"]), mlp_ratio=float(m["mlp_ratio"]), qkv_bias=True)
                for _ in range(int(m["decoder_depth"]))])
            self.decoder_norm = nn.LayerNorm(ddim)
            self.decoder_pred = nn.Linear(ddim, int(bins))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            for mod in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
                if isinstance(mod, nn.Linear):
                    nn.init.xavier_uniform_(mod.weight)
                    if mod.bias is not None:
                        nn.init.zeros_(mod.bias)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(ddim, grid, grid, cls_token=True),
                             persistent=False)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Unmasked tokens after the final norm: [B, 1 + N, D], [CLS] first."""
        return self.encoder.forward_features(patches)

    def forward_encoder(self, patches, ratio, generator):
        enc = self.encoder
        x = enc.patch_embed(patches)  # [B, N, D]
        B, N, D = x.shape
        x = x + enc.pos_embed[:, 1:]
        ids_keep, ids_restore, mask = random_masking(B, N, ratio, generator, x.device)
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(B, -1, -1)
        x = enc.norm_pre(torch.cat([cls, x], dim=1))
        for blk in enc.blocks:
            x = blk(x)
        return enc.norm(x), ids_restore, mask

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        B, T, C = x.shape
        N = ids_restore.shape[1]
        tokens = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(B, N + 1 - T, -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, C))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, patches: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        """(pred [B, N, bins] for every token, mask [B, N] bool True = masked)."""
        latent, ids_restore, mask = self.forward_encoder(patches, mask_ratio, generator)
        return self.forward_decoder(latent, ids_restore), mask


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

class PatchDataset(torch.utils.data.Dataset):
    """Patches of the patch stage's shards, memory-mapped (opened lazily in each process).

    patch_shards: [(patches.npy, index.parquet), ...] (shard s = position s in the list).
    Either `doc_ids` (the patches of these documents; None = all) or `rows`, an int array [M, 2]
    of (shard, row) pairs (e.g. the cluster table's shard / row columns; index files not read).
    Item i -> float32 tensor [1, H, W] (ink 1.0), or (tensor, int64 label) when `labels` [M] is
    given. `rows` (array [M, 2]) tells which patch item i is.
    """

    def __init__(self, patch_shards, doc_ids=None, *, rows=None, labels=None):
        self.paths = [str(p[0]) for p in patch_shards]
        self.lengths, shapes = [], set()
        for path in self.paths:
            arr = np.load(path, mmap_mode="r")
            if arr.ndim != 3:
                raise InputError(f"{path}: patches must be [N, H, W], got shape {arr.shape}")
            self.lengths.append(len(arr))
            if len(arr):
                shapes.add(tuple(arr.shape[1:]))
        if len(shapes) > 1:
            raise InputError(f"patch shards hold patches of different sizes: {sorted(shapes)}")
        self.patch_shape = shapes.pop() if shapes else None
        if rows is None:
            wanted = None if doc_ids is None else {str(d) for d in doc_ids}
            parts = []
            for s, (npy, index_path) in enumerate(patch_shards):
                docs = pd.read_parquet(index_path, columns=["doc_id"]).doc_id.astype(str)
                if len(docs) != self.lengths[s]:
                    raise InputError(f"{index_path} has {len(docs)} rows but {npy} {self.lengths[s]} patches")
                sel = np.arange(len(docs)) if wanted is None else np.flatnonzero(docs.isin(wanted).to_numpy())
                parts.append(np.stack([np.full(len(sel), s), sel], axis=1))
            rows = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
        rows = np.asarray(rows, np.int64).reshape(-1, 2)
        if len(rows):
            if rows[:, 0].min() < 0 or rows[:, 0].max() >= len(self.paths):
                raise InputError(f"patch rows refer to shard {int(rows[:, 0].max())}, "
                                 f"but there are {len(self.paths)} patch shards")
            lengths = np.asarray(self.lengths)[rows[:, 0]]
            if (rows[:, 1] < 0).any() or (rows[:, 1] >= lengths).any():
                bad = int(np.flatnonzero((rows[:, 1] < 0) | (rows[:, 1] >= lengths))[0])
                raise InputError(f"patch row {int(rows[bad, 1])} does not exist in shard {int(rows[bad, 0])} "
                                 f"({self.paths[rows[bad, 0]]}, {self.lengths[rows[bad, 0]]} patches)")
        self.rows = rows
        self.labels = None if labels is None else np.asarray(labels, np.int64)
        if self.labels is not None and len(self.labels) != len(rows):
            raise ValueError(f"{len(self.labels)} labels for {len(rows)} patches")
        self._arrays = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = {}  # memory maps are reopened in worker processes
        return state

    def __len__(self):
        return len(self.rows)

    def _array(self, shard: int) -> np.ndarray:
        arr = self._arrays.get(shard)
        if arr is None:
            arr = self._arrays[shard] = np.load(self.paths[shard], mmap_mode="r")
        return arr

    def patch(self, i: int) -> np.ndarray:
        shard, row = self.rows[int(i)]
        return np.asarray(self._array(int(shard))[int(row)])

    def __getitem__(self, i):
        img = torch.from_numpy(self.patch(i).astype(np.float32))[None]
        if self.labels is None:
            return img
        return img, torch.tensor(int(self.labels[int(i)]))


# --------------------------------------------------------------------------------------------
# Trainer and stage
# --------------------------------------------------------------------------------------------

class SaghogTrainer(NetTrainer):
    # loss_mean_hog: the loss of predicting, at every masked position, the batch's mean HOG there;
    # an encoder that learns nothing about the visible tokens does no better.
    loss_keys = ("loss", "loss_mean_hog")

    def __init__(self, s: dict, device: torch.device, niter_per_epoch: int, world_size: int = 1, ddp: bool = False,
                 rank: int = 0):
        net = SaghogMAE(s["model"], bins=int(s["hog_bins"]), seed=int(s["seed"]))
        if s.get("init"):  # start from a checkpoint's encoder (the decoder starts afresh)
            load_checked(net.encoder, s["init"])
        super().__init__(net, s, device, niter_per_epoch, world_size, ddp, scale_lr=False)
        self.rank = int(rank)

    def loss(self, patches: torch.Tensor, it: int) -> tuple[torch.Tensor, float]:
        generator = seeded_generator(self.s["seed"], it, self.rank)
        with self.opt.autocast():
            pred, mask = self.net_ddp(patches, float(self.s["mask_ratio"]), generator)
        target = hog_targets(patches, cell=self.net.patch_size, bins=int(self.s["hog_bins"]))
        baseline = masked_mse(target.float().mean(0, keepdim=True).expand_as(target), target, mask)
        return masked_mse(pred, target, mask), baseline.item()

    def step(self, batch, it: int, epoch: int) -> dict:
        patches = batch[0] if isinstance(batch, (list, tuple)) else batch
        patches = patches.to(self.device, non_blocking=self.device.type == "cuda")
        scheduled = self.opt.set_iteration(it)
        loss, baseline = self.loss(patches, it)
        self.opt.step(loss, it)
        return {"loss": loss.item(), "loss_mean_hog": baseline, **scheduled}

    def export(self) -> dict:
        return self.net.encoder.state_dict()


def settings_with_defaults(settings: dict) -> dict:
    """The settings with the paper's defaults for missing keys (model keys merged one by one)."""
    s = {**DEFAULTS, **settings}
    s["model"] = model_with_defaults(settings.get("model"))
    if s["method"] != "saghog":
        raise InputError(f"saghog settings: method is {s['method']!r}, expected 'saghog'")
    if not 0.0 < float(s["mask_ratio"]) < 1.0:
        raise InputError(f"saghog settings: mask_ratio must be in (0, 1), got {s['mask_ratio']}")
    if int(s["hog_bins"]) < 2:
        raise InputError(f"saghog settings: hog_bins must be >= 2, got {s['hog_bins']}")
    return s


def pretrain_saghog(patch_shards, doc_ids, settings: dict, out_dir, *, device: str = "auto", progress: bool = True,
                    stop_after_epochs: int | None = None) -> dict:
    """Train SAGHOG on the patches of `doc_ids` (train pages; None = every patch) -> out_dir/backbone.pt
    (the encoder's state_dict) and out_dir/log.parquet."""
    s = settings_with_defaults(settings)
    doc_ids = None if doc_ids is None else [str(d) for d in doc_ids]
    dataset = PatchDataset(patch_shards, doc_ids)
    n_docs = "all" if doc_ids is None else len(set(doc_ids))
    if len(dataset) == 0:
        raise InputError(f"saghog: no patches for the {n_docs} given document(s) in {len(patch_shards)} "
                         "patch shard(s)")
    size = int(s["model"]["img_size"])
    if dataset.patch_shape != (size, size):
        raise InputError(f"saghog: patches are {dataset.patch_shape}, but model img_size is {size}")
    log.info("saghog: %d patches of %s documents", len(dataset), n_docs)
    return train(dataset, s, out_dir,
                 lambda dev, niter, ws, rank, ddp: SaghogTrainer(s, dev, niter, ws, ddp, rank),
                 device=device, progress=progress, stop_after_epochs=stop_after_epochs, cap=int(s["max_patches"]),
                 name="saghog")
