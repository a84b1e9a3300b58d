"""Fine-tuning stage (SAGHOG line): the pretrained SAGHOG encoder + NetRVLAD, trained with a
multi-similarity loss on the cluster stage's pseudo labels.

- `NetRVLAD` (Miech et al.): soft assignment a_ik = softmax_k(w_k . x_i + b_k) of the patch
  tokens x_i, V_k = sum_i a_ik x_i (no centroid subtraction), L2 per cluster ("intra
  normalisation"), flattened, global L2 -> one [K * D] vector per patch. Computed in float32.
- `multi_similarity_loss` (Wang et al., CVPR 2019) with its pair mining.
- `m_per_class_batches`: class-balanced batches, m patches of each of `classes_per_batch`
  clusters.
- `finetune`: the stage (train-split patches with a cluster label != -1 only) -> model.pt
  ({"encoder": state_dict, "netrvlad": state_dict}) and log.parquet.
- `patch_encoder`: a callable patches -> vectors for the embedding stage ([CLS] of the
  pretrained encoder, or the NetRVLAD vector of the fine-tuned network).
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .devices import resolve_device
from .errors import InputError
from .pretrain.loop import NetTrainer, train
from .pretrain.saghog import PatchDataset, build_encoder, load_encoder, model_with_defaults

log = logging.getLogger("writer_retrieval")

MODEL_FILE = "model.pt"
DEFAULTS = {"method": "netrvlad", "epochs": 5, "lr": 1e-4, "min_lr": 1e-6, "warmup_epochs": 0, "weight_decay": 0.05,
            "weight_decay_end": 0.05, "clip_grad": 0.0, "clusters": 100, "m_per_class": 4, "classes_per_batch": 32,
            "max_patches": 0, "alpha": 2.0, "beta": 50.0, "base": 0.5, "margin": 0.1, "seed": 0, "num_workers": 0,
            "amp": "bf16", "checkpoint_every": 1}


# --------------------------------------------------------------------------------------------
# NetRVLAD and the loss
# --------------------------------------------------------------------------------------------

class NetRVLAD(nn.Module):
    """tokens [B, N, D] -> [B, clusters * D], intra-normalised per cluster, then L2-normalised."""

    def __init__(self, dim: int, clusters: int = 100):
        super().__init__()
        self.dim, self.clusters = int(dim), int(clusters)
        self.assign = nn.Linear(self.dim, self.clusters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            a = torch.softmax(F.linear(x, self.assign.weight.float(), self.assign.bias.float()), dim=-1)  # [B, N, K]
            v = torch.einsum("bnk,bnd->bkd", a, x)
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


def multi_similarity_loss(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5, margin: float = 0.1) -> torch.Tensor:
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
# Network, trainer, stage
# --------------------------------------------------------------------------------------------

class FinetuneNet(nn.Module):
    """SAGHOG encoder -> its patch tokens (not [CLS]) -> NetRVLAD: one vector per patch."""

    def __init__(self, encoder: nn.Module, clusters: int = 100):
        super().__init__()
        self.encoder = encoder
        self.netrvlad = NetRVLAD(encoder.embed_dim, clusters)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(patches)
        return self.netrvlad(tokens[:, int(getattr(self.encoder, "num_prefix_tokens", 1)):])


class FinetuneTrainer(NetTrainer):
    loss_keys = ("loss", "valid_anchors")

    def __init__(self, s: dict, model: dict, encoder_path, device: torch.device, niter_per_epoch: int,
                 world_size: int = 1, ddp: bool = False):
        encoder = load_encoder(encoder_path, model, "cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s["seed"]))
            net = FinetuneNet(encoder, int(s["clusters"]))
        super().__init__(net, s, device, niter_per_epoch, world_size, ddp, scale_lr=False)

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
        loss, valid = self.loss(patches, labels)
        self.opt.step(loss, it)
        return {"loss": loss.item(), "valid_anchors": valid, **scheduled}

    def export(self) -> dict:
        return {"encoder": self.net.encoder.state_dict(), "netrvlad": self.net.netrvlad.state_dict()}


def settings_with_defaults(settings: dict) -> dict:
    s = {**DEFAULTS, **settings}
    if s["method"] != "netrvlad":
        raise InputError(f"finetune settings: method {s['method']!r} unknown; allowed: netrvlad")
    for key in ("m_per_class", "classes_per_batch", "clusters"):
        if int(s[key]) < (2 if key != "clusters" else 1):
            raise InputError(f"finetune settings: {key} = {s[key]} is too small")
    s["batch_size"] = int(s["m_per_class"]) * int(s["classes_per_batch"])
    return s


def training_patches(patch_shards, labels_path) -> PatchDataset:
    """Train-split patches with a cluster label (!= -1) of the cluster stage's patches.parquet."""
    table = pd.read_parquet(labels_path, columns=["split", "shard", "row", "cluster"])
    keep = (table.split == "train").to_numpy() & (table.cluster.to_numpy() >= 0)
    if not keep.any():
        raise InputError(f"finetune: no train-split patch with a cluster label in {labels_path} "
                         f"({len(table)} patches, {int((table.split == 'train').sum())} of the train split)")
    rows = np.stack([table.shard.to_numpy()[keep], table.row.to_numpy()[keep]], axis=1)
    return PatchDataset(patch_shards, rows=rows, labels=table.cluster.to_numpy()[keep])


def finetune(patch_shards, labels_path, encoder_path, model: dict, settings: dict, out_dir, *, device: str = "auto",
             progress: bool = True, stop_after_epochs: int | None = None) -> dict:
    """Fine-tune encoder + NetRVLAD on the pseudo labels -> out_dir/model.pt and out_dir/log.parquet."""
    s = settings_with_defaults(settings)
    model = model_with_defaults(model)
    s["model"] = model
    dataset = training_patches(patch_shards, labels_path)
    size = int(model["img_size"])
    if dataset.patch_shape != (size, size):
        raise InputError(f"finetune: patches are {dataset.patch_shape}, but model img_size is {size}")
    sampler = functools.partial(m_per_class_batches, dataset.labels, int(s["m_per_class"]),
                                int(s["classes_per_batch"]), int(s["max_patches"]), int(s["seed"]))
    log.info("finetune: %d labelled train patches in %d clusters", len(dataset), len(np.unique(dataset.labels)))
    return train(dataset, s, out_dir,
                 lambda dev, niter, ws, rank, ddp: FinetuneTrainer(s, model, encoder_path, dev, niter, ws, ddp),
                 device=device, progress=progress, stop_after_epochs=stop_after_epochs, batch_sampler=sampler,
                 model_file=MODEL_FILE, name="finetune")


def load_finetuned(path, model: dict, device="cpu") -> FinetuneNet:
    """The network saved by `finetune` (model.pt), in eval mode; the cluster count comes from the file."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    state = torch.load(path, map_location="cpu", weights_only=True)
    encoder = build_encoder(model)
    encoder.load_state_dict(state["encoder"])
    encoder.pos_embed.requires_grad_(False)
    net = FinetuneNet(encoder, int(state["netrvlad"]["assign.weight"].shape[0]))
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
