"""What every training method shares: the epoch loop with checkpoint / resume, devices and DDP,
AdamW with warm-up + cosine schedules, mixed precision, and the windows of binarized pages.

A method supplies a dataset (with an optional `set_epoch`) and a trainer object:

- `loss_keys`: the per-iteration values averaged into each epoch's log row ("loss" first);
  `last_keys`: values logged as of the epoch's last iteration (lr, weight decay, ...);
- `step(batch, it, epoch) -> dict` (one optimisation step);
- `train_mode()`, `state_dict()`, `load_state_dict(state)`, `export() -> state_dict` (what
  the stage writes as its model file).

Determinism: every random decision is a function of (seed, epoch, sample index) or
(seed, iteration, rank), and global RNGs are reseeded at every epoch start, so a run resumed
from `checkpoint.pt` ends with the same weights as an uninterrupted one (CPU, fixed seed).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..devices import resolve_device
from ..errors import InputError
from ..storage import atomic_path, write_parquet
from ..vit import to_input

log = logging.getLogger("writer_retrieval")

CHECKPOINT = "checkpoint.pt"
BACKBONE = "backbone.pt"
LOG_TABLE = "log.parquet"
# Settings that may change between a killed run and its resumption without a warning.
RESUMABLE_CHANGES = {"num_workers", "checkpoint_every", "amp"}


# --------------------------------------------------------------------------------------------
# Schedules and optimisation
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


class Optimization:
    """AdamW (no decay on norms, biases and tokens), per-iteration lr / weight-decay schedules,
    autocast on GPU (bf16, or fp16 with a GradScaler) and gradient clipping to clip_grad.

    lr = settings.lr * batch_size * world_size / 256 when `scale_lr` (the DINO/AttMask rule),
    else settings.lr as given; it warms up linearly, then decays by a cosine to min_lr.
    clip_mode (default global): "global" clips the norm of all gradients together,
    "per_parameter" each parameter's gradient norm on its own (DINO's clip_gradients).
    """
    CLIP_MODES = ("global", "per_parameter")

    def __init__(self, module: nn.Module, s: dict, niter_per_epoch: int, device: torch.device,
                 world_size: int = 1, scale_lr: bool = True):
        self.module = module
        self.device = device
        self.optimizer = torch.optim.AdamW(_param_groups(module), lr=0.0, weight_decay=0.0)
        amp = s.get("amp", "none") if device.type == "cuda" else "none"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=(amp == "fp16"))
        epochs, n = int(s["epochs"]), int(niter_per_epoch)
        lr = float(s["lr"]) * (int(s["batch_size"]) * world_size / 256.0 if scale_lr else 1.0)
        self.lr_schedule = cosine_schedule(lr, float(s["min_lr"]), epochs, n, float(s["warmup_epochs"]))
        self.wd_schedule = cosine_schedule(float(s["weight_decay"]), float(s.get("weight_decay_end",
                                                                                   s["weight_decay"])), epochs, n)
        self.clip = float(s.get("clip_grad", 0.0))
        self.clip_mode = s.get("clip_mode", "global")
        if self.clip_mode not in self.CLIP_MODES:
            raise ValueError(f"clip_mode {self.clip_mode!r} not in {', '.join(self.CLIP_MODES)}")

    def set_iteration(self, it: int) -> dict:
        it = min(it, len(self.lr_schedule) - 1)
        lr, wd = float(self.lr_schedule[it]), float(self.wd_schedule[it])
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        return {"lr": lr, "weight_decay": wd}

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def step(self, loss: torch.Tensor, it: int, before_step=None) -> None:
        """Backward, clip, optimiser step; `before_step()` may edit gradients (frozen layers)."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at iteration {it}; "
                                     "lower lr or use amp 'bf16'/'none'")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip > 0:
            self.scaler.unscale_(self.optimizer)
            self.clip_gradients()
        if before_step is not None:
            before_step()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def clip_gradients(self) -> None:
        """Scale gradients down to norm clip_grad (factor clip / (norm + 1e-6) when below 1)."""
        if self.clip_mode == "global":
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
            return
        for p in self.module.parameters():
            if p.grad is not None:
                torch.nn.utils.clip_grad_norm_(p, self.clip)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


class NetTrainer:
    """A trainer of one network `net` (DDP-wrapped as `net_ddp`) with one Optimization `opt`:
    the state, train mode and loop keys every single-network method shares."""

    last_keys = ("lr", "weight_decay")

    def __init__(self, net: nn.Module, s: dict, device: torch.device, niter_per_epoch: int, world_size: int,
                 ddp: bool, scale_lr: bool):
        self.s, self.device = s, device
        self.net = net.to(device)
        self.net_ddp = wrap_ddp(self.net, device, ddp)
        self.opt = Optimization(self.net, s, niter_per_epoch, device, world_size, scale_lr=scale_lr)

    def train_mode(self) -> None:
        self.net.train()

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), **self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state)


def wrap_ddp(module: nn.Module, device: torch.device, ddp: bool) -> nn.Module:
    if not ddp:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


# --------------------------------------------------------------------------------------------
# Windows of binarized pages (AttMask and the spatial-context pretext tasks)
# --------------------------------------------------------------------------------------------

def window_positions(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering 0..length with the given stride; the last window ends at the border."""
    if length <= window:
        return [0]
    pos = list(range(0, length - window + 1, stride))
    if pos[-1] + window < length:
        pos.append(length - window)
    return pos


def load_pages(page_masks, window: int, stride: int, min_ink: float, progress: bool):
    """Pages as packed bits (padded to >= window) and the (page, y, x) of windows with enough ink."""
    import cv2
    from tqdm.auto import tqdm

    from ..imaging import read_mask

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


def page_windows(page_masks, s: dict, progress: bool):
    """load_pages with the settings' window, overlap and ink threshold; an error if none qualifies."""
    window = int(s["window"])
    stride = max(int(round(window * (1 - float(s["window_overlap"])))), 1)
    pages, index, skipped = load_pages(page_masks, window, stride, float(s["min_ink"]), progress)
    if len(index) == 0:
        raise InputError(f"pretrain: no {window}x{window} window with >= {s['min_ink']:.0%} ink "
                         f"in {len(page_masks)} page mask(s)")
    log.info("pretrain: %d pages, %d windows (%d skipped with < %.1f%% ink)", len(page_masks), len(index),
             skipped, 100 * float(s["min_ink"]))
    return pages, index


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
    return centre_box(height, width, ratio)


def centre_box(height: int, width: int, ratio) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the centre crop with the aspect ratio clipped into `ratio` (the
    fallback of random_resized_crop_box)."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def seeded_generator(seed: int, iteration: int, rank: int = 0, *stream: int) -> torch.Generator:
    """A CPU generator seeded by (seed, iteration, rank[, stream]): the same draws on any device and
    after a resume."""
    state = np.random.SeedSequence([int(seed), int(iteration), int(rank), *stream]).generate_state(2, np.uint32)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


def dilate(x: torch.Tensor) -> torch.Tensor:
    """3x3 dilation of [N, C, H, W]; pixels outside the image are ignored (as cv2.dilate's border)."""
    return F.max_pool2d(x, 3, stride=1, padding=1)


def erode(x: torch.Tensor) -> torch.Tensor:
    """3x3 erosion of [N, C, H, W]; pixels outside the image are ignored (as cv2.erode's border)."""
    return -F.max_pool2d(-x, 3, stride=1, padding=1)


# Augmentation defaults shared by the window datasets (AttMask's: no colour jitter, no flip).
# augment_on: workers = per sample with OpenCV in the loader workers (WindowDataset.crop); device =
# raw windows, augmented as a batch by the trainer (augment.py).
AUGMENTATION = {"blur_sigma": [0.1, 1.0], "erode_p": 0.5, "dilate_p": 0.5, "window_overlap": 0.5, "min_ink": 0.01,
                "augment_on": "workers"}


class WindowDataset(torch.utils.data.Dataset):
    """Windows cut from binarized pages. Randomness comes from np.random.default_rng([seed, epoch, i])
    so that a sample's augmentation does not depend on worker count, order or resumption.
    Call set_epoch(e). Subclasses define __getitem__ from `rng_for`, `window_at` and `crop`."""

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

    def rng_for(self, i: int) -> np.random.Generator:
        return np.random.default_rng([int(self.s["seed"]), self.epoch, int(i)])

    def window_at(self, i: int) -> np.ndarray:
        p, y, x = (int(v) for v in self.index[i])
        w = self.window
        packed = self.pages[p]
        b0, b1 = x // 8, (x + w + 7) // 8 + 1
        bits = np.unpackbits(packed[y:y + w, b0:b1], axis=1)
        off = x - 8 * b0
        return bits[:, off:off + w]  # uint8 0/1

    def raw_window(self, i: int) -> torch.Tensor:
        """Window i as a uint8 tensor [H, W], for augmentation on the trainer's device."""
        return torch.from_numpy(np.ascontiguousarray(self.window_at(int(i))))

    def crop(self, rng, win, size, scale, blur_p) -> np.ndarray:
        """Random resized crop, 3x3 erosion / dilation, resize to size x size, Gaussian blur: float32 [size, size]."""
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
        return np.clip(img, 0.0, 1.0)

    def crop_input(self, rng, win, size, scale, blur_p) -> torch.Tensor:
        return to_input(self.crop(rng, win, size, scale, blur_p))


def _worker_init(worker_id: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    seed = torch.initial_seed() % 2**32  # base seed (drawn from the per-epoch seeded RNG) + worker id
    random.seed(seed)
    np.random.seed(seed)


def epoch_subset(n: int, cap: int, seed: int, epoch: int) -> np.ndarray:
    """Indices of the samples used in `epoch`: all, or a seeded sample of `cap`."""
    if cap and 0 < cap < n:
        rng = np.random.default_rng([int(seed), int(epoch), 1])
        return np.sort(rng.choice(n, size=int(cap), replace=False))
    return np.arange(n)


# --------------------------------------------------------------------------------------------
# Distributed helpers, RNG, checkpoints
# --------------------------------------------------------------------------------------------

def _dist_env() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


@contextlib.contextmanager
def distributed(device: str):
    """(device, world_size, rank, use_ddp): a process group when started by torchrun."""
    import torch.distributed as dist

    dev = resolve_device(device)
    started = False
    world_size, rank = 1, 0
    if _dist_env() or (dist.is_available() and dist.is_initialized()):
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
            started = True
        world_size, rank = dist.get_world_size(), dist.get_rank()
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        yield dev, world_size, rank, world_size > 1 or started or _dist_env()
    finally:
        if started:
            dist.destroy_process_group()


def all_reduce_mean(values: list[float], device, world_size: int) -> list[float]:
    if world_size <= 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / world_size).tolist()


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
    return {k: v for k, v in settings.items() if k not in RESUMABLE_CHANGES}


def _save_checkpoint(trainer, s, epoch, rows, path, world_size, rank, is_main):
    """All ranks' RNG states are gathered; rank 0 writes the file atomically."""
    import torch.distributed as dist

    states = {str(rank): _rng_state()}
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, states)
        states = {k: v for d in gathered for k, v in d.items()}
    if is_main:
        ckpt = {"trainer": trainer.state_dict(), "epoch": int(epoch), "settings": s, "log": rows,
                "rng": states, "format": 2}
        with atomic_path(path, ".pt") as tmp:
            torch.save(ckpt, tmp)
    if world_size > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------------
# The epoch loop
# --------------------------------------------------------------------------------------------

def train(dataset, s: dict, out_dir, make_trainer, *, device: str = "auto", progress: bool = True,
          stop_after_epochs: int | None = None, cap: int = 0, batch_sampler=None, model_file: str = BACKBONE,
          name: str = "pretrain") -> dict:
    """Train for s["epochs"] epochs, resuming from out_dir/checkpoint.pt; write out_dir/<model_file>
    (trainer.export()) and out_dir/log.parquet (one row per epoch) on rank 0.

    make_trainer(device, niter_per_epoch, world_size, rank, ddp) builds the trainer. Batches come
    from a DistributedSampler over a seeded `cap`-sized subset per epoch, or from
    batch_sampler(epoch, rank, world_size) -> list of index lists (class-balanced sampling).
    `stop_after_epochs` is a test hook: return right after that epoch's checkpoint, as if killed.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    seed, epochs, bs = int(s["seed"]), int(s["epochs"]), int(s["batch_size"])
    with distributed(device) as (dev, world_size, rank, use_ddp):
        import torch.distributed as dist

        is_main = rank == 0
        planned = s.get("effective_batch_size")  # hashed into the run's folder: the world must match it
        if planned is not None and bs * world_size != int(planned):
            raise InputError(f"{name}: batch_size {bs} x {world_size} processes = {bs * world_size}, but this run's "
                             f"effective batch is {planned}; set gpus so that batch_size x gpus = {planned}")
        if batch_sampler is None:
            per_epoch = len(epoch_subset(len(dataset), cap, seed, 0))
            per_rank = math.ceil(per_epoch / world_size)
            drop_last = per_rank >= bs
            niter = per_rank // bs if drop_last else 1
            if not drop_last:
                log.warning("%s: only %d samples per process for batch size %d: one short batch per epoch",
                            name, per_rank, bs)
        else:
            per_epoch = sum(len(b) for b in batch_sampler(0, rank, world_size)) * world_size
            niter = len(batch_sampler(0, rank, world_size))
        if is_main:
            log.info("%s: %d samples, %d per epoch, %d iterations/epoch, world size %d, device %s", name,
                     len(dataset), per_epoch, niter, world_size, dev)
        trainer = make_trainer(dev, niter, world_size, rank, use_ddp)

        start_epoch, rows = 0, []
        ckpt_path = out_dir / CHECKPOINT
        if ckpt_path.exists():
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if _comparable(ckpt.get("settings", {})) != _comparable(s):
                log.warning("%s: settings differ from those of %s; resuming anyway", name, ckpt_path)
            trainer.load_state_dict(ckpt["trainer"])
            start_epoch = int(ckpt["epoch"])
            rows = list(ckpt.get("log", []))
            rng_states = ckpt.get("rng", {})
            if str(rank) in rng_states:
                _set_rng_state(rng_states[str(rank)])
            if is_main:
                log.info("%s: resuming from %s after epoch %d", name, ckpt_path, start_epoch)
            del ckpt

        workers = int(s.get("num_workers", 0))
        loader_options = dict(num_workers=workers, pin_memory=(dev.type == "cuda"), worker_init_fn=_worker_init,
                              # forked workers deadlock once the parent's OpenMP/BLAS thread pools run
                              multiprocessing_context="forkserver" if workers > 0 else None)
        for epoch in range(start_epoch, epochs):
            _seed_epoch(seed, epoch, rank)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            if batch_sampler is None:
                subset = torch.utils.data.Subset(dataset, epoch_subset(len(dataset), cap, seed, epoch).tolist())
                sampler = torch.utils.data.distributed.DistributedSampler(
                    subset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
                sampler.set_epoch(epoch)
                loader = torch.utils.data.DataLoader(subset, batch_size=bs, sampler=sampler, drop_last=drop_last,
                                                     **loader_options)
            else:
                loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler(epoch, rank, world_size),
                                                     **loader_options)
            trainer.train_mode()
            t0 = time.perf_counter()
            sums = dict.fromkeys(trainer.loss_keys, 0.0)
            count = n_images = 0
            last = {}
            bar = tqdm(loader, desc=f"{name} epoch {epoch + 1}/{epochs}", disable=not (progress and is_main),
                       leave=False, unit="it")
            for i, batch in enumerate(bar):
                last = trainer.step(batch, epoch * niter + i, epoch)
                for k in sums:
                    sums[k] += last[k]
                count += 1
                first = batch[0] if isinstance(batch, (list, tuple)) else batch
                n_images += first.shape[0] * world_size
                if progress and is_main:
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
            bar.close()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
            means = dict(zip(sums, all_reduce_mean([v / max(count, 1) for v in sums.values()], dev, world_size)))
            row = {"epoch": epoch + 1, **means, **{k: last.get(k, float("nan")) for k in trainer.last_keys},
                   "seconds": seconds, "images_per_second": n_images / seconds if seconds > 0 else float("nan")}
            rows.append(row)
            if is_main:
                log.info("%s epoch %d/%d: %s, %.1f s, %.1f images/s", name, epoch + 1, epochs,
                         ", ".join(f"{k} {v:.4f}" for k, v in means.items()), seconds, row["images_per_second"])
            done = epoch + 1
            if done % int(s.get("checkpoint_every", 1)) == 0 or done == epochs or done == stop_after_epochs:
                _save_checkpoint(trainer, s, done, rows, ckpt_path, world_size, rank, is_main)
            if stop_after_epochs is not None and done >= stop_after_epochs and done < epochs:
                return {"epochs": done, "stopped": True}

        if is_main:
            with atomic_path(out_dir / model_file, ".pt") as tmp:
                torch.save(trainer.export(), tmp)
            import pandas as pd

            columns = ["epoch", *trainer.loss_keys, *trainer.last_keys, "seconds", "images_per_second"]
            write_parquet(pd.DataFrame(rows, columns=columns), out_dir / LOG_TABLE)
        if use_ddp:
            dist.barrier()
        final = rows[-1] if rows else {}
        return {"epochs": epochs, **{k: final.get(k) for k in trainer.loss_keys},
                "seconds": float(sum(r["seconds"] for r in rows)),
                "images_per_second": final.get("images_per_second"), "samples": len(dataset),
                "samples_per_epoch": int(per_epoch), "device": str(dev), "world_size": world_size,
                "resumed_from_epoch": start_epoch}
