"""Spatial-context pretext tasks for the ViT backbone (Penarrubia et al. 2024).

A window crop of a binarized training page is transformed and the backbone's [CLS] token,
through a linear head, predicts which transformation was applied (cross-entropy):

- `flip`: 0 = none, 1 = mirrored left-right, 2 = mirrored upside down.
- `rotation`: label k = rotated by k x 90 degrees counter-clockwise (np.rot90), k in 0..3.
- `jigsaw`: the crop is cut into a grid x grid of tiles; label p = index of the permutation in
  `permutation_set`; tile position j of the output shows input tile perm[j] (row-major).
- `sorting`: the crop is cut into `strips` vertical strips along the writing direction (left to
  right), shuffled by permutation p as above; predict p (the order that sorts them back).

Permutation sets: all n! permutations in lexicographic order when n! <= `permutations`, else a
greedy maximal-Hamming-distance subset of `permutations` (identity first), as in the jigsaw
literature, so that the classes are as distinguishable as possible.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from ..vit import build_backbone, forward_tokens, to_input
from .augment import BatchAugmenter, on_device
from .loop import AUGMENTATION, NetTrainer, WindowDataset, page_windows, train

TASKS = ("flip", "rotation", "jigsaw", "sorting")
REQUIRED_SETTINGS = ("method", "model", "epochs", "batch_size", "lr", "min_lr", "warmup_epochs", "weight_decay",
                     "weight_decay_end", "clip_grad", "crop_size", "crop_scale", "window", "max_windows", "seed",
                     "num_workers", "amp")
OPTIONAL_SETTINGS = {**AUGMENTATION, "checkpoint_every": 1, "blur_p": 0.5, "jigsaw_grid": 2, "sorting_strips": 4,
                     "permutations": 24}


def permutation_set(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """[P, n] permutations of n tiles: all of them if n! <= limit, else `limit` far-apart ones."""
    if n < 2:
        raise InputError(f"pretext permutations need at least 2 tiles, got {n}")
    if math.factorial(n) <= limit:
        return np.array(list(itertools.permutations(range(n))), np.int64)
    if n > 10:
        raise InputError(f"pretext permutations of {n} tiles: at most 10 tiles are supported")
    candidates = np.array(list(itertools.permutations(range(n))), np.int8)
    rng = np.random.default_rng(seed)
    chosen = [0]  # the identity
    min_dist = (candidates != candidates[0]).sum(1)
    for _ in range(limit - 1):
        best = np.flatnonzero(min_dist == min_dist.max())
        pick = int(rng.choice(best))
        chosen.append(pick)
        min_dist = np.minimum(min_dist, (candidates != candidates[pick]).sum(1))
    return candidates[chosen].astype(np.int64)


def tile_grid(shape: tuple[int, int], task: str, s: dict) -> tuple[int, int]:
    """(rows, columns) of tiles of a task on an image of `shape` (its last two axes)."""
    grid = (int(s["jigsaw_grid"]),) * 2 if task == "jigsaw" else (1, int(s["sorting_strips"]))
    shape = shape[-2:]
    if shape[0] % grid[0] or shape[1] % grid[1]:
        raise InputError(f"pretext {task}: crop {shape[1]}x{shape[0]} does not split into {grid[1]}x{grid[0]} tiles")
    return grid


def shuffle_tiles(img, grid: tuple[int, int], perm):
    """Output tile j (row-major) = input tile perm[j], over the last two axes (array or tensor)."""
    rows, cols = grid
    th, tw = img.shape[-2] // rows, img.shape[-1] // cols
    tiles = [img[..., r * th:(r + 1) * th, c * tw:(c + 1) * tw] for r in range(rows) for c in range(cols)]
    out = img.copy() if isinstance(img, np.ndarray) else img.clone()
    for j, src in enumerate(perm):
        r, c = divmod(j, cols)
        out[..., r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tiles[int(src)]
    return out


class PretextTask:
    """The transformations of one task: n_classes and apply(img, label)."""

    def __init__(self, task: str, s: dict):
        if task not in TASKS:
            raise InputError(f"pretext task {task!r} unknown; allowed: {', '.join(TASKS)}")
        self.task, self.s = task, s
        self.perms = None
        if task in ("jigsaw", "sorting"):
            n = int(s["jigsaw_grid"]) ** 2 if task == "jigsaw" else int(s["sorting_strips"])
            self.perms = permutation_set(n, int(s["permutations"]), int(s["seed"]))
        self.n_classes = {"flip": 3, "rotation": 4}.get(task) or len(self.perms)

    def apply(self, img: np.ndarray, label: int) -> np.ndarray:
        label = int(label)
        if not 0 <= label < self.n_classes:
            raise ValueError(f"{self.task}: label {label} not in 0..{self.n_classes - 1}")
        if self.task == "flip":
            return img if label == 0 else np.ascontiguousarray(img[:, ::-1] if label == 1 else img[::-1])
        if self.task == "rotation":
            if img.shape[0] != img.shape[1]:
                raise InputError("rotation needs square crops")
            return np.ascontiguousarray(np.rot90(img, label))
        return shuffle_tiles(img, tile_grid(img.shape, self.task, self.s), self.perms[label])

    def apply_batch(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`apply` on a batch [N, 1, H, W] on its device: image i transformed by labels[i] (CPU)."""
        out = images.clone()
        for label in labels.unique().tolist():
            pick = (labels == label).to(images.device)
            x = images[pick]
            if self.task == "flip":
                x = x if label == 0 else x.flip(-1 if label == 1 else -2)
            elif self.task == "rotation":
                x = torch.rot90(x, label, dims=(-2, -1))
            else:
                x = shuffle_tiles(x, tile_grid(x.shape, self.task, self.s), self.perms[label])
            out[pick] = x
        return out


class PretextDataset(WindowDataset):
    """Item i -> (transformed crop [1, S, S], label) with the label drawn uniformly per sample;
    with augment_on: device (raw window [H, W] uint8, label), cropped and transformed by the trainer."""

    def __init__(self, pages, index, settings: dict, task: PretextTask):
        super().__init__(pages, index, settings)
        self.task = task

    def __getitem__(self, i):
        s = self.s
        rng = self.rng_for(i)
        if on_device(s):
            return self.raw_window(i), torch.tensor(int(rng.integers(self.task.n_classes)))
        img = self.crop(rng, self.window_at(int(i)), int(s["crop_size"]), s["crop_scale"], s["blur_p"])
        label = int(rng.integers(self.task.n_classes))
        return to_input(self.task.apply(img, label)), torch.tensor(label)


class PretextNet(nn.Module):
    def __init__(self, backbone: nn.Module, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, n_classes)

    def forward(self, img):
        return self.head(forward_tokens(self.backbone, img)[:, 0])


class PretextTrainer(NetTrainer):
    loss_keys = ("loss", "accuracy", "chance")  # chance: the accuracy of guessing (1 / classes)

    def __init__(self, s: dict, n_classes: int, device: torch.device, niter_per_epoch: int, world_size: int = 1,
                 ddp: bool = False, rank: int = 0, task: PretextTask | None = None):
        backbone = build_backbone(s["model"], seed=int(s["seed"]), init=s.get("init"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s["seed"]) + 1)
            net = PretextNet(backbone, n_classes)
        super().__init__(net, s, device, niter_per_epoch, world_size, ddp, scale_lr=True)
        self.chance = 1.0 / n_classes
        self.rank, self.task = int(rank), task  # the task transforms the batch with augment_on: device

    def prepare(self, batch, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) on the device; with augment_on: device cropped, augmented and transformed here."""
        nb = self.device.type == "cuda"
        images, labels = batch
        if on_device(self.s):
            s = self.s
            crops = BatchAugmenter(images, s, it, self.rank, self.device).crops(1, int(s["crop_size"]),
                                                                                s["crop_scale"], s["blur_p"])
            images = self.task.apply_batch(crops[:, 0], labels)
        return images.to(self.device, non_blocking=nb), labels.to(self.device, non_blocking=nb)

    def step(self, batch, it: int, epoch: int) -> dict:
        images, labels = self.prepare(batch, it)
        scheduled = self.opt.set_iteration(it)
        with self.opt.autocast():
            logits = self.net_ddp(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.opt.step(loss, it)
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        return {"loss": loss.item(), "accuracy": accuracy, "chance": self.chance, **scheduled}

    def export(self) -> dict:
        return self.net.backbone.state_dict()


def settings_with_defaults(settings: dict) -> dict:
    missing = [k for k in REQUIRED_SETTINGS if k not in settings]
    if missing:
        raise InputError(f"pretrain settings: missing key(s) {', '.join(missing)}")
    s = {**OPTIONAL_SETTINGS, **settings}
    if s["method"] not in TASKS:
        raise InputError(f"pretrain settings: method {s['method']!r} is not a pretext task ({', '.join(TASKS)})")
    p = int(s["model"]["patch_size"])
    if int(s["crop_size"]) % p:
        raise InputError(f"pretrain settings: crop_size = {s['crop_size']} is not a multiple of patch_size {p}")
    return s


def pretrain_pretext(page_masks: list[str], settings: dict, out_dir, *, device: str = "auto", progress: bool = True,
                     stop_after_epochs: int | None = None) -> dict:
    """Train the ViT on one pretext task over windows of binarized TRAIN pages -> backbone.pt, log.parquet."""
    s = settings_with_defaults(settings)
    task = PretextTask(s["method"], s)
    if s["method"] in ("jigsaw", "sorting"):
        tile_grid((int(s["crop_size"]),) * 2, s["method"], s)  # the crop must split into whole tiles
    pages, index = page_windows(page_masks, s, progress)
    return train(PretextDataset(pages, index, s, task), s, out_dir,
                 lambda dev, niter, ws, rank, ddp: PretextTrainer(s, task.n_classes, dev, niter, ws, ddp, rank, task),
                 device=device, progress=progress, stop_after_epochs=stop_after_epochs, cap=int(s["max_windows"]),
                 name=s["method"])
