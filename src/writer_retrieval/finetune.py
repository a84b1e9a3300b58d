"""Fine-tuning stage (SAGHOG line): the pretrained SAGHOG encoder + NetRVLAD, trained with a
multi-similarity loss on the cluster stage's pseudo labels and early-stopped on the retrieval mAP
of held-out train writers.

- `NetRVLAD`: soft assignment a_ik = softmax_k(w_k . x_i + b_k) of a patch's vectors x_i,
  V_k = sum_i a_ik (x_i - c_k) (residuals to centroids c_k) or sum_i a_ik x_i (none), optionally
  L2 per cluster ("intra normalisation"), flattened, global L2 -> one [K * D] vector per patch,
  computed in float32. `POOLINGS` names the two designs: cls_residual (Peer et al. 2024 and their
  code): the encoder's output [CLS] of the patch, residuals to centroids initialised by k-means on
  [CLS] vectors of train patches, no intra-normalisation; tokens (this project's first design):
  the patch's 64 patch tokens, no residuals, intra-normalised.
- `multi_similarity_loss` (Wang et al., CVPR 2019) with its pair mining.
- `m_per_class_batches`: class-balanced batches, m patches of each of `classes_per_batch` clusters.
- `layer_decay_groups`: AdamW groups whose lr is scaled by layer_decay^(depth + 1 - layer), layer 0
  = the embeddings, b + 1 = block b, depth + 1 = the final norm and NetRVLAD (full lr).
- `erode_dilate`: 3x3 erosion / dilation of the training patches, each with its probability.
- `Validation` / `EarlyStopping`: page descriptors of the held-out writers' pages as embed_patches
  makes them, mAP by writer after every epoch; the best epoch's weights are exported, and training
  ends after `patience` epochs without a better one.
- `finetune`: the stage -> model.pt ({"encoder", "netrvlad": state_dicts, "pooling": name}) and
  log.parquet.
- `patch_encoder`: a callable patches -> vectors for the embedding stage ([CLS] of the
  pretrained encoder, or the NetRVLAD vector of the fine-tuned network).
"""
from __future__ import annotations

import functools
import logging
import math
import os

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .devices import resolve_device
from .errors import InputError
from .normalise import power_l2
from .pretrain.loop import (LOG_TABLE, NetTrainer, _param_groups, all_reduce_mean, dilate, erode, seeded_generator,
                            train)
from .pretrain.saghog import PatchDataset, build_encoder, load_encoder, model_with_defaults
from .metrics import evaluate
from .storage import write_parquet
from .vlad import fit_codebook

log = logging.getLogger("writer_retrieval")

MODEL_FILE = "model.pt"
# The published design's values (Peer et al. 2024, their fine-tuning config): lr 1e-3 -> 1e-5 after
# 5 warm-up epochs, layer decay 0.25, weight decay 0.01, clipping at 1, batches of 64 x 16 patches,
# MS loss 2 / 40 / 0.2 with mining margin 0.1, 10 % of the train writers for validation, patience 10.
DEFAULTS = {"method": "netrvlad", "pooling": "cls_residual", "epochs": 30, "lr": 1e-3, "min_lr": 1e-5,
            "warmup_epochs": 5, "weight_decay": 0.01, "weight_decay_end": 0.01, "clip_grad": 1.0,
            "layer_decay": 0.25, "clusters": 100, "m_per_class": 16, "classes_per_batch": 64, "max_patches": 0,
            "alpha": 2.0, "beta": 40.0, "base": 0.2, "margin": 0.1, "erode_p": 0.5, "dilate_p": 0.5,
            "validation_writers": 0.1, "patience": 10, "seed": 0, "num_workers": 0, "amp": "bf16",
            "checkpoint_every": 1}
POOLINGS = {"cls_residual": {"residual": True, "intra_norm": False},
            "tokens": {"residual": False, "intra_norm": True}}
# k-means of the NetRVLAD centroids: on at most this many train patches (as the published code).
KMEANS_SAMPLE, KMEANS_ITERATIONS = 200_000, 20


# --------------------------------------------------------------------------------------------
# NetRVLAD and the loss
# --------------------------------------------------------------------------------------------

class NetRVLAD(nn.Module):
    """vectors [B, N, D] -> [B, clusters * D] (see the module docstring); `centroids` [K, D] only
    with residuals."""

    def __init__(self, dim: int, clusters: int = 100, residual: bool = True, intra_norm: bool = False):
        super().__init__()
        self.dim, self.clusters, self.intra_norm = int(dim), int(clusters), bool(intra_norm)
        self.assign = nn.Linear(self.dim, self.clusters)
        self.centroids = nn.Parameter(torch.zeros(self.clusters, self.dim)) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            a = torch.softmax(F.linear(x, self.assign.weight.float(), self.assign.bias.float()), dim=-1)  # [B, N, K]
            v = torch.einsum("bnk,bnd->bkd", a, x)
            if self.centroids is not None:  # sum_i a_ik (x_i - c_k) = sum_i a_ik x_i - (sum_i a_ik) c_k
                v = v - a.sum(dim=1)[:, :, None] * self.centroids.float()[None]
            if self.intra_norm:
                v = F.normalize(v, dim=-1)
            return F.normalize(v.reshape(len(v), -1), dim=-1)


def _multi_similarity(embeddings, labels, alpha, beta, base, margin):
    """(loss, share of anchors with a mined positive and a mined negative)."""
    x = F.normalize(embeddings.float(), dim=-1)
    labels = labels.to(x.device).reshape(-1)
    sim = x @ x.t()
    n = len(x)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    pos, neg = same & ~eye, ~same
    inf = torch.tensor(float("inf"), device=x.device)
    min_pos = torch.where(pos, sim, inf).min(dim=1, keepdim=True).values
    max_neg = torch.where(neg, sim, -inf).max(dim=1, keepdim=True).values
    neg_kept = neg & (sim > min_pos - margin)
    pos_kept = pos & (sim < max_neg + margin)
    valid = pos_kept.any(dim=1) & neg_kept.any(dim=1)
    very_small = -1e4  # exp() of it is 0 in float32, without the NaN gradients of -inf
    pos_lse = torch.logsumexp(torch.where(pos_kept, -alpha * (sim - base), very_small), dim=1)
    neg_lse = torch.logsumexp(torch.where(neg_kept, beta * (sim - base), very_small), dim=1)
    per_anchor = F.softplus(pos_lse) / alpha + F.softplus(neg_lse) / beta
    loss = torch.where(valid, per_anchor, torch.zeros_like(per_anchor)).sum() / max(n, 1)
    return loss, float(valid.float().mean()) if n else 0.0


def multi_similarity_loss(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float = 2.0, beta: float = 40.0,
                          base: float = 0.2, margin: float = 0.1) -> torch.Tensor:
    """Multi-similarity loss with its pair mining, mean over all anchors of the batch.

    S = cosine similarities. For anchor i, positives P_i (same label, j != i), negatives N_i.
    Mined negatives: S_ij > min_{P_i} S - margin; mined positives: S_ij < max_{N_i} S + margin.
    L_i = 1/alpha log(1 + sum_P~ exp(-alpha (S_ij - base))) + 1/beta log(1 + sum_N~ exp(beta (S_ij - base))),
    0 for an anchor without a mined positive or a mined negative; loss = sum_i L_i / batch size.
    """
    return _multi_similarity(embeddings, labels, alpha, beta, base, margin)[0]


# --------------------------------------------------------------------------------------------
# Class-balanced batches
# --------------------------------------------------------------------------------------------

def m_per_class_batches(labels, m: int, classes_per_batch: int, cap: int, seed: int, epoch: int, rank: int = 0,
                        world_size: int = 1) -> list[list[int]]:
    """This rank's batches of one epoch: each batch = m samples of each of `classes_per_batch`
    distinct classes (all classes if there are fewer usable ones), drawn uniformly.

    Labels -1 are never used; classes with a single sample are skipped (no positive pair).
    Per class, samples are taken in order from successive random permutations of its members
    (every member is used once per pass; no sample twice within a batch); a class with fewer
    than m (>= 2) samples gives all its members plus random repeats (sampling with replacement).
    About `cap` samples per epoch (0: as many as labelled samples), as whole batches; the batch
    count is rounded down to a multiple of world_size (at least world_size) and batch b goes to
    rank b % world_size, so ranks get disjoint batches of equal number. Everything is drawn
    from np.random.default_rng([seed, epoch, 2]): the same on every rank.
    """
    labels = np.asarray(labels).reshape(-1)
    m, classes_per_batch, world_size = int(m), int(classes_per_batch), max(int(world_size), 1)
    if m < 2:
        raise InputError(f"m_per_class must be >= 2 (a class needs a positive pair), got {m}")
    labelled = np.flatnonzero(labels >= 0)
    order = labelled[np.argsort(labels[labelled], kind="stable")]
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    usable = counts >= 2
    members = [order[s:s + c] for s, c in zip(starts[usable], counts[usable])]
    if len(members) < 2:
        raise InputError(f"m-per-class sampling needs at least 2 classes with >= 2 samples, got {len(members)} "
                         f"({len(labelled)} labelled samples)")
    per_batch = min(classes_per_batch, len(members))
    batch_size = per_batch * m
    total = int(cap) if cap and int(cap) > 0 else len(labelled)
    n_batches = max(total // batch_size, 1)
    n_batches = max(n_batches - n_batches % world_size, world_size)
    rng = np.random.default_rng([int(seed), int(epoch), 2])
    cycles = [np.zeros(0, np.int64) for _ in members]
    cursor = [0] * len(members)
    batches = []
    for _ in range(n_batches):
        batch = []
        for c in rng.choice(len(members), size=per_batch, replace=False):
            group = members[c]
            if len(group) < m:
                batch.extend(group.tolist() + rng.choice(group, size=m - len(group), replace=True).tolist())
                continue
            if cursor[c] + m > len(cycles[c]):  # the rest of this cycle, then a fresh shuffle
                rest = cycles[c][cursor[c]:]
                fresh = rng.permutation(group)
                if len(rest):  # no sample twice within the batch
                    fresh = np.concatenate([fresh[~np.isin(fresh, rest)], fresh[np.isin(fresh, rest)]])
                cycles[c], cursor[c] = np.concatenate([rest, fresh]), 0
            batch.extend(cycles[c][cursor[c]:cursor[c] + m].tolist())
            cursor[c] += m
        batches.append(batch)
    return batches[int(rank)::world_size]


# --------------------------------------------------------------------------------------------
# Network, layer-wise lr decay, augmentation
# --------------------------------------------------------------------------------------------

class FinetuneNet(nn.Module):
    """SAGHOG encoder -> its output [CLS] (cls_residual) or its patch tokens (tokens) -> NetRVLAD:
    one vector per patch."""

    def __init__(self, encoder: nn.Module, clusters: int = 100, pooling: str = "cls_residual"):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.netrvlad = NetRVLAD(encoder.embed_dim, clusters, **POOLINGS[pooling])

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(patches)
        if self.pooling == "cls_residual":
            return self.netrvlad(tokens[:, :1])
        return self.netrvlad(tokens[:, int(getattr(self.encoder, "num_prefix_tokens", 1)):])


def _layer_of(name: str, depth: int) -> int:
    """0 = the embeddings, b + 1 = encoder block b, depth + 1 = everything after the blocks."""
    parts = name.split(".")
    if parts[0] == "encoder" and parts[1] == "blocks":
        return int(parts[2]) + 1
    if parts[0] == "encoder" and parts[1] in ("cls_token", "reg_token", "pos_embed", "patch_embed"):
        return 0
    return depth + 1


def layer_decay_groups(net: FinetuneNet, layer_decay: float) -> list[dict]:
    """AdamW parameter groups, one per (layer, weight decay or not), each with `lr_scale` =
    layer_decay^(depth + 1 - layer) and `wd_scale` 1 or 0 (norms, biases, tokens: no decay)."""
    depth = len(net.encoder.blocks)
    layer = {id(p): _layer_of(name, depth) for name, p in net.named_parameters()}
    groups: dict[tuple[int, float], dict] = {}
    for part in _param_groups(net):  # the decay / no-decay split every trainer uses
        wd_scale = 0.0 if part.get("weight_decay") == 0.0 else 1.0
        for p in part["params"]:
            key = (layer[id(p)], wd_scale)
            groups.setdefault(key, {"params": [], "lr_scale": float(layer_decay) ** (depth + 1 - key[0]),
                                    "wd_scale": wd_scale})["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def apply_group_scales(optimizer: torch.optim.Optimizer, scheduled: dict) -> None:
    """The iteration's lr and weight decay, times each group's scales."""
    for group in optimizer.param_groups:
        group["lr"] = scheduled["lr"] * group["lr_scale"]
        group["weight_decay"] = scheduled["weight_decay"] * group["wd_scale"]


def erode_dilate(patches: torch.Tensor, erode_p: float, dilate_p: float, generator: torch.Generator) -> torch.Tensor:
    """Per patch [B, 1, H, W] (ink 1): 3x3 erosion with probability erode_p, then 3x3 dilation with
    probability dilate_p; the draws come from the CPU `generator` (device-independent)."""
    draws = torch.rand(2, len(patches), generator=generator).to(patches.device)
    x = torch.where((draws[0] < erode_p)[:, None, None, None], erode(patches), patches)
    return torch.where((draws[1] < dilate_p)[:, None, None, None], dilate(x), x)


def encoded(forward, dataset, batch_size: int, device: torch.device):
    """forward(patches on `device`) of the dataset's patches, batch by batch (labels dropped)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=max(int(batch_size), 1))
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        yield forward(x.to(device, non_blocking=device.type == "cuda"))


@torch.no_grad()
def kmeans_centroids(forward, dataset, clusters: int, seed: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """k-means (faiss) centroids [clusters, D] of forward(patches) of a seeded sample of at most
    KMEANS_SAMPLE patches of `dataset`."""
    n = len(dataset)
    take = np.sort(np.random.default_rng([int(seed), 3]).choice(n, size=min(n, KMEANS_SAMPLE), replace=False))
    subset = torch.utils.data.Subset(dataset, take.tolist())
    vectors = torch.cat([v.float().cpu() for v in encoded(forward, subset, batch_size, device)])
    log.info("finetune: NetRVLAD centroids by k-means of %d [CLS] vectors", len(vectors))
    return torch.from_numpy(fit_codebook(vectors.numpy(), int(clusters), KMEANS_ITERATIONS, int(seed)))


# --------------------------------------------------------------------------------------------
# Validation on held-out writers, early stopping
# --------------------------------------------------------------------------------------------

def held_out_writers(pages_of: pd.Series, setting: float, seed: int) -> list[str]:
    """Writers held out for validation, a seeded choice among the train writers with >= 2 pages:
    ceil(setting x writers) of them (at least 2) for a fraction setting < 1, `setting` writers
    for setting >= 1, none for 0. `pages_of`: writer -> number of train pages with patches."""
    setting = float(setting)
    if setting <= 0:
        return []
    n = len(pages_of)
    want = max(2, math.ceil(setting * n)) if setting < 1 else int(setting)
    eligible = sorted(str(w) for w, c in pages_of.items() if c >= 2)
    if want > len(eligible) or want >= n:
        raise InputError(f"finetune: validation_writers {setting:g} asks for {want} held-out writers with >= 2 "
                         f"pages, but the train split has {n} writers ({len(eligible)} with >= 2 pages) and "
                         "training needs one; lower validation_writers (0 = no validation)")
    return sorted(np.random.default_rng([int(seed), 4]).choice(eligible, size=want, replace=False).tolist())


class Validation:
    """The held-out pages: descriptor = signed power + L2 of the sum of the page's patch
    encodings (as embed_patches makes them); `map` = leave-one-out retrieval mAP by writer."""

    def __init__(self, patches: PatchDataset, page_of_patch: np.ndarray, writers: list[str], power: float,
                 batch_size: int):
        self.patches, self.writers, self.power, self.batch_size = patches, writers, float(power), int(batch_size)
        self.page_of_patch = torch.as_tensor(np.asarray(page_of_patch, np.int64))

    @torch.no_grad()
    def map(self, net: nn.Module, device: torch.device) -> float:
        sums, start = None, 0
        for y in encoded(net, self.patches, self.batch_size, device):
            y = y.double()
            if sums is None:
                sums = torch.zeros(len(self.writers), y.shape[1], dtype=torch.float64, device=y.device)
            sums.index_add_(0, self.page_of_patch[start:start + len(y)].to(y.device), y)
            start += len(y)
        return float(evaluate(power_l2(sums.cpu().numpy(), self.power), self.writers)[0]["map"])


class EarlyStopping:
    """The best validation mAP so far, its epoch and the weights then; `stopped` once `patience`
    epochs in a row brought no better mAP."""

    def __init__(self, patience: int):
        self.patience = int(patience)
        self.best_map, self.best_epoch, self.last_epoch, self.best_state = -math.inf, 0, 0, None

    def update(self, epoch: int, value: float, state) -> None:
        """Record epoch `epoch`'s mAP; `state()` gives its weights, taken only for a new best."""
        self.last_epoch = int(epoch)
        if value > self.best_map:
            self.best_map, self.best_epoch, self.best_state = float(value), int(epoch), state()

    @property
    def stopped(self) -> bool:
        return self.best_epoch > 0 and self.last_epoch - self.best_epoch >= self.patience

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


# --------------------------------------------------------------------------------------------
# Trainer and stage
# --------------------------------------------------------------------------------------------

class FinetuneTrainer(NetTrainer):
    loss_keys = ("loss", "valid_anchors")
    last_keys = ("lr", "weight_decay", "val_map", "best_epoch")

    def __init__(self, s: dict, model: dict, encoder_path, train_set, device: torch.device, niter_per_epoch: int,
                 world_size: int = 1, ddp: bool = False, rank: int = 0, validation: Validation | None = None,
                 early: EarlyStopping | None = None):
        encoder = load_encoder(encoder_path, model, "cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s["seed"]))
            net = FinetuneNet(encoder, int(s["clusters"]), s["pooling"])
        super().__init__(net, s, device, niter_per_epoch, world_size, ddp, scale_lr=False)
        self.niter, self.world_size, self.rank = int(niter_per_epoch), int(world_size), int(rank)
        self.validation, self.early = validation, early
        if self.net.netrvlad.centroids is not None:  # k-means of train [CLS] vectors
            cls = lambda x: self.net.encoder.forward_features(x)[:, 0]  # noqa: E731
            with self.opt.autocast():
                centroids = kmeans_centroids(cls, train_set, int(s["clusters"]), int(s["seed"]), int(s["batch_size"]),
                                             device)
            self.net.netrvlad.centroids.data.copy_(centroids.to(device))
        self.opt.optimizer = torch.optim.AdamW(layer_decay_groups(self.net, float(s["layer_decay"])), lr=0.0,
                                               weight_decay=0.0)

    def loss(self, patches, labels):
        """(multi-similarity loss, share of valid anchors) of a batch."""
        with self.opt.autocast():
            emb = self.net_ddp(patches)
        s = self.s
        return _multi_similarity(emb, labels, float(s["alpha"]), float(s["beta"]), float(s["base"]),
                                 float(s["margin"]))

    def step(self, batch, it: int, epoch: int) -> dict:
        patches, labels = (t.to(self.device, non_blocking=self.device.type == "cuda") for t in batch)
        scheduled = self.opt.set_iteration(it)
        apply_group_scales(self.opt.optimizer, scheduled)
        patches = erode_dilate(patches, float(self.s["erode_p"]), float(self.s["dilate_p"]),
                               seeded_generator(self.s["seed"], it, self.rank))
        loss, valid = self.loss(patches, labels)
        self.opt.step(loss, it)
        row = {"loss": loss.item(), "valid_anchors": valid, **scheduled}
        if self.validation is not None and (it + 1) % self.niter == 0:  # the epoch's last iteration
            row.update(self.validate(epoch + 1))
        return row

    def validate(self, epoch: int) -> dict:
        self.net.eval()
        with self.opt.autocast():
            value = self.validation.map(self.net, self.device)
        self.net.train()
        value = all_reduce_mean([value], self.device, self.world_size)[0]  # every rank decides alike
        self.early.update(epoch, value, self.weights)
        log.info("finetune epoch %d: validation mAP %.4f (best %.4f, epoch %d)", epoch, value, self.early.best_map,
                 self.early.best_epoch)
        if self.early.stopped:
            log.info("finetune: no better validation mAP for %d epochs: stopping", self.early.patience)
        return {"val_map": value, "best_epoch": self.early.best_epoch}

    def weights(self) -> dict:
        return {part: {k: v.detach().to("cpu", copy=True) for k, v in getattr(self.net, part).state_dict().items()}
                for part in ("encoder", "netrvlad")}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "early": self.early.state_dict() if self.early else None}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.early is not None:
            self.early.load_state_dict(state["early"])

    def export(self) -> dict:
        best = self.early.best_state if self.early is not None and self.early.best_state else self.weights()
        return {**best, "pooling": self.s["pooling"]}


def settings_with_defaults(settings: dict) -> dict:
    s = {**DEFAULTS, **settings}
    if s["method"] != "netrvlad":
        raise InputError(f"finetune settings: method {s['method']!r} unknown; allowed: netrvlad")
    if s["pooling"] not in POOLINGS:
        raise InputError(f"finetune settings: pooling {s['pooling']!r} unknown; allowed: {', '.join(POOLINGS)}")
    for key in ("m_per_class", "classes_per_batch", "clusters", "patience"):
        if int(s[key]) < (2 if key in ("m_per_class", "classes_per_batch") else 1):
            raise InputError(f"finetune settings: {key} = {s[key]} is too small")
    if float(s["validation_writers"]) > 0 and "power" not in s:
        raise InputError("finetune settings: validation needs the page descriptors' power (embed.power)")
    s["batch_size"] = int(s["m_per_class"]) * int(s["classes_per_batch"])
    return s


def training_patches(patch_shards, labels_path, index_path, s: dict) -> tuple[PatchDataset, Validation | None]:
    """Train-split patches with a cluster label (!= -1) of the cluster stage's patches.parquet, but
    those of the held-out writers, whose pages (every patch) form the validation set."""
    table = pd.read_parquet(labels_path, columns=["doc_id", "split", "shard", "row", "cluster"])
    index = pd.read_parquet(index_path, columns=["doc_id", "writer"])
    train = (table.split == "train").to_numpy()
    writer = table.doc_id.map(dict(zip(index.doc_id.astype(str), index.writer.astype(str)))).to_numpy()
    pages = pd.Series(table.doc_id[train].to_numpy()).groupby(writer[train]).nunique()
    held = np.isin(writer, held_out_writers(pages, s["validation_writers"], int(s["seed"]))) & train
    keep = train & ~held & (table.cluster.to_numpy() >= 0)
    if not keep.any():
        raise InputError(f"finetune: no train-split patch with a cluster label in {labels_path} "
                         f"({len(table)} patches, {int(train.sum())} of the train split)")
    rows = table[["shard", "row"]].to_numpy()
    dataset = PatchDataset(patch_shards, rows=rows[keep], labels=table.cluster.to_numpy()[keep])
    if not held.any():
        return dataset, None
    docs, page_of_patch = np.unique(table.doc_id.to_numpy()[held].astype(str), return_inverse=True)
    writers = index.set_index(index.doc_id.astype(str)).writer.astype(str).loc[docs].tolist()
    log.info("finetune: %d pages of %d held-out writers for validation", len(docs), len(set(writers)))
    return dataset, Validation(PatchDataset(patch_shards, rows=rows[held]), page_of_patch, writers, s["power"],
                               s["batch_size"])


def finetune(patch_shards, labels_path, index_path, encoder_path, model: dict, settings: dict, out_dir, *,
             device: str = "auto", progress: bool = True, stop_after_epochs: int | None = None) -> dict:
    """Fine-tune encoder + NetRVLAD on the pseudo labels -> out_dir/model.pt and out_dir/log.parquet."""
    s = settings_with_defaults(settings)
    model = model_with_defaults(model)
    s["model"] = model
    dataset, validation = training_patches(patch_shards, labels_path, index_path, s)
    size = int(model["img_size"])
    if dataset.patch_shape != (size, size):
        raise InputError(f"finetune: patches are {dataset.patch_shape}, but model img_size is {size}")
    early = EarlyStopping(int(s["patience"])) if validation is not None else None
    balanced = functools.partial(m_per_class_batches, dataset.labels, int(s["m_per_class"]),
                                 int(s["classes_per_batch"]), int(s["max_patches"]), int(s["seed"]))

    def sampler(epoch, rank, world_size):  # no batches once stopped early (the loop has no stop)
        return [] if early is not None and early.stopped else balanced(epoch, rank, world_size)

    def trainer(dev, niter, world_size, rank, ddp):
        return FinetuneTrainer(s, model, encoder_path, dataset, dev, niter, world_size, ddp, rank, validation, early)

    log.info("finetune: %d labelled train patches in %d clusters", len(dataset), len(np.unique(dataset.labels)))
    result = train(dataset, s, out_dir, trainer, device=device, progress=progress, stop_after_epochs=stop_after_epochs,
                   batch_sampler=sampler, model_file=MODEL_FILE, name="finetune")
    if early is None or result.get("stopped"):
        return result
    return {**result, **trained_epochs(out_dir, early)}


def trained_epochs(out_dir, early: EarlyStopping) -> dict:
    """Drop the log rows of the epochs after an early stop (no batches); the run's best epoch."""
    path = os.path.join(out_dir, LOG_TABLE)
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes the log
        table = pd.read_parquet(path)
        write_parquet(table[table.epoch <= early.last_epoch].reset_index(drop=True), path)
    return {"epochs": early.last_epoch, "best_epoch": early.best_epoch, "val_map": early.best_map}


def load_finetuned(path, model: dict, device="cpu") -> FinetuneNet:
    """The network saved by `finetune` (model.pt), in eval mode; cluster count and pooling come from the file."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    state = torch.load(path, map_location="cpu", weights_only=True)
    encoder = build_encoder(model)
    encoder.load_state_dict(state["encoder"])
    encoder.pos_embed.requires_grad_(False)
    net = FinetuneNet(encoder, int(state["netrvlad"]["assign.weight"].shape[0]), state["pooling"])
    net.netrvlad.load_state_dict(state["netrvlad"])
    return net.to(dev).eval()


def patch_encoder(backbone_path, model: dict, finetuned_path=None, settings: dict | None = None, device="auto",
                  batch_size: int = 256):
    """A callable patches (uint8 [n, H, W], ink 1) -> float32 [n, F]: the pretrained encoder's [CLS]
    token (F = embed_dim), or with `finetuned_path` the NetRVLAD vector (F = clusters * embed_dim).
    The callable has a `dim` attribute (F)."""
    dev = resolve_device(device)
    if finetuned_path:
        net = load_finetuned(finetuned_path, model, dev)
        if settings is not None and int(settings.get("clusters", net.netrvlad.clusters)) != net.netrvlad.clusters:
            raise InputError(f"{finetuned_path}: {net.netrvlad.clusters} NetRVLAD clusters, settings say "
                             f"{settings['clusters']}")
        forward, dim = net, net.netrvlad.clusters * net.netrvlad.dim
    else:
        encoder = load_encoder(backbone_path, model, dev)
        forward, dim = (lambda x: encoder.forward_features(x)[:, 0]), encoder.embed_dim
    batch_size = max(int(batch_size), 1)

    @torch.no_grad()
    def encode(patches) -> np.ndarray:
        arr = np.asarray(patches)
        if arr.ndim == 2:
            arr = arr[None]
        out = []
        for start in range(0, len(arr), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(arr[start:start + batch_size], dtype=np.float32))[:, None]
            x = x.to(dev, non_blocking=True)
            if dev.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = forward(x)
            else:
                y = forward(x)
            out.append(y.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    encode.dim = dim
    return encode
