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
  normalised) for [CLS] and patch tokens, followed by one weight-normalised last layer for both
  (`shared_head`, iBOT's shared head) or two (`out_dim` for [CLS], `patch_out_dim` for patches).
  Last layers are weight-normalised with the norm fixed to 1 (DINO's norm_last_layer=True) and
  get no update during the first `freeze_last_layer` epochs.
- Drop path (stochastic depth) in the student only; the teacher is built without it.
- Teacher temperatures rise linearly from their warm-up values over `warmup_teacher_temp_epochs`,
  constant within an epoch (as published); the masking ratio of an iteration is drawn from
  U(mask_ratio - mask_ratio_var, mask_ratio + mask_ratio_var).
- Mask token: a learnable (1, embed_dim) parameter attached to the backbone as
  `backbone.mask_token` (so it is saved in backbone.pt and restored by `load_backbone`). It is
  spliced in right after `patch_embed`, before position embeddings (see `forward_tokens`).
- The student's patch head runs only on the masked patches (the only ones the loss uses); the
  teacher's runs on all patches (needed for the patch center).
- Patch loss per view = mean over images of (mean CE over that image's masked patches), images
  without masked patches contributing 0 (as in iBOT); total = loss_cls + loss_patch.
- lr = settings.lr * (batch_size * world_size) / 256 (batch_size is per process, as in the paper).
- Gradient clipping per parameter (`clip_mode: per_parameter`, the published code) or by the
  global norm.
- The epoch loop, checkpoints, DDP and the optimiser are shared with the other methods (loop.py).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from ..vit import _forward, build_backbone
from .augment import BatchAugmenter, on_device
from .loop import AUGMENTATION, Optimization, WindowDataset, cosine_schedule, page_windows, train, wrap_ddp

REQUIRED_SETTINGS = (
    "method", "model", "epochs", "batch_size", "lr", "min_lr", "warmup_epochs", "weight_decay",
    "weight_decay_end", "clip_grad", "momentum_teacher", "teacher_temp", "student_temp",
    "patch_teacher_temp", "out_dim", "patch_out_dim", "masking", "mask_ratio", "mask_probability",
    "global_size", "local_size", "n_local_crops", "global_scale", "local_scale", "window",
    "max_windows", "seed", "num_workers", "amp",
)
# Optional settings and their defaults (not part of the shared config contract).
OPTIONAL_SETTINGS = {
    **AUGMENTATION,
    "checkpoint_every": 1,
    "head_hidden_dim": 2048,
    "head_bottleneck_dim": 256,
    "head_layers": 3,
    "center_momentum": 0.9,
    "blur_p_global": 0.5,
    "blur_p_local": 0.5,
}
# Published recipe elements the schema sets to the paper's values; a caller that leaves one out
# gets it switched off (a warm-up temperature left out is the final temperature).
RECIPE_OFF = {"freeze_last_layer": 0, "drop_path": 0.0, "shared_head": False, "mask_ratio_var": 0.0,
              "clip_mode": "global", "warmup_teacher_temp_epochs": 0}
MASKING_MODES = ("attmask_high", "random", "block")


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
    """Shared projection MLP -> L2-normalised bottleneck -> [CLS] / patch last layers (one shared
    layer when `shared`, which needs patch_out_dim == out_dim)."""

    def __init__(self, in_dim, out_dim, patch_out_dim, hidden_dim=2048, bottleneck_dim=256, n_layers=3,
                 shared: bool = False):
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
        self.last_patch = self.last_cls if shared else NormedLinear(bottleneck_dim, patch_out_dim)

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
        self.last_global_cls = cls_tokens.detach()  # backbone features of the globals (health signals)
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


def _settings_with_defaults(settings: dict) -> dict:
    missing = [k for k in REQUIRED_SETTINGS if k not in settings]
    if missing:
        raise InputError(f"pretrain settings: missing key(s) {', '.join(missing)}")
    defaults = {**OPTIONAL_SETTINGS, **RECIPE_OFF}
    s = dict(defaults)
    s.update({k: v for k, v in settings.items()})
    for k, v in defaults.items():
        if s.get(k) is None:
            s[k] = v
    for warm, final in (("warmup_teacher_temp", "teacher_temp"), ("warmup_patch_teacher_temp", "patch_teacher_temp")):
        if s.get(warm) is None:
            s[warm] = s[final]
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
    if s["shared_head"] and int(s["out_dim"]) != int(s["patch_out_dim"]):
        raise InputError(f"pretrain settings: shared_head needs patch_out_dim == out_dim, got {s['patch_out_dim']} "
                         f"and {s['out_dim']} (set shared_head: false for separate last layers)")
    if int(s["checkpoint_every"]) < 1:
        s["checkpoint_every"] = 1
    return s


def warmup_schedule(warmup: float, final: float, warmup_epochs: int, epochs: int, niter_per_epoch: int) -> np.ndarray:
    """Per iteration: linear from `warmup` (epoch 0) to `final` (epoch warmup_epochs - 1), then `final`;
    constant within an epoch, as DINO/iBOT schedule the teacher temperature."""
    per_epoch = np.concatenate([np.linspace(warmup, final, warmup_epochs), np.full(epochs, final)])[:epochs]
    return np.repeat(per_epoch, niter_per_epoch)


class AttMaskTrainer:
    """Student, teacher, optimiser, centers and one training step (no data handling)."""

    def __init__(self, settings: dict, device: torch.device, niter_per_epoch: int, world_size: int = 1,
                 rank: int = 0, ddp: bool = False):
        s = self.s = _settings_with_defaults(settings)
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.niter_per_epoch = int(niter_per_epoch)
        backbone = build_backbone(s["model"], seed=int(s["seed"]), drop_path=float(s["drop_path"]),
                                  init=s.get("init"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s["seed"]) + 1)
            head = AttMaskHead(backbone.embed_dim, int(s["out_dim"]), int(s["patch_out_dim"]),
                               int(s["head_hidden_dim"]), int(s["head_bottleneck_dim"]), int(s["head_layers"]),
                               shared=bool(s["shared_head"]))
        self.student = MultiCropNet(backbone, head).to(device)
        # Same weights, no drop path (the published recipe builds the teacher without it).
        self.teacher = MultiCropNet(build_backbone(s["model"], seed=int(s["seed"])), copy.deepcopy(head)).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student_ddp = wrap_ddp(self.student, device, ddp)
        self.patch_size = int(s["model"]["patch_size"])
        self.center = torch.zeros(1, int(s["out_dim"]), device=device)
        self.patch_center = torch.zeros(1, int(s["patch_out_dim"]), device=device)
        self.opt = Optimization(self.student, s, niter_per_epoch, device, world_size)
        epochs = int(s["epochs"])
        n = self.niter_per_epoch
        self.momentum_schedule = cosine_schedule(float(s["momentum_teacher"]), 1.0, epochs, n)
        warm = int(s["warmup_teacher_temp_epochs"])
        self.teacher_temp_schedule = warmup_schedule(float(s["warmup_teacher_temp"]), float(s["teacher_temp"]),
                                                     warm, epochs, n)
        self.patch_temp_schedule = warmup_schedule(float(s["warmup_patch_teacher_temp"]),
                                                   float(s["patch_teacher_temp"]), warm, epochs, n)

    def temperatures(self, it: int) -> tuple[float, float]:
        """The teacher temperatures ([CLS], patches) of iteration `it`."""
        i = min(it, len(self.teacher_temp_schedule) - 1)
        return float(self.teacher_temp_schedule[i]), float(self.patch_temp_schedule[i])

    # -- masks ------------------------------------------------------------------------------
    def make_mask(self, n_images: int, grid: tuple[int, int], attention: torch.Tensor | None, it: int) -> torch.Tensor:
        s = self.s
        rng = np.random.default_rng([int(s["seed"]), int(it), int(self.rank), 2])
        n = grid[0] * grid[1]
        apply = rng.random(n_images) < float(s["mask_probability"])
        ratio, var = float(s["mask_ratio"]), float(s["mask_ratio_var"])
        if var > 0:  # one ratio for the whole batch, as AttMask draws it
            ratio = float(rng.uniform(ratio - var, ratio + var))
        if s["masking"] == "attmask_high":
            if attention is None:
                raise ValueError("attmask_high needs the teacher's attention")
            mask = attention_mask(attention, ratio)
        elif s["masking"] == "random":
            mask = torch.from_numpy(random_mask(n_images, n, ratio, rng))
        else:
            mask = torch.from_numpy(block_mask(n_images, grid, ratio, rng))
        mask = mask.to(self.device) & torch.from_numpy(apply).to(self.device)[:, None]
        return mask

    # -- loss -------------------------------------------------------------------------------
    def loss(self, s_cls, s_patch, t_cls, t_patch, mask, n_global: int, it: int):
        s = self.s
        st = float(s["student_temp"])
        tt, ptt = self.temperatures(it)
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

    @torch.no_grad()
    def health(self, s_cls, s_patch, t_cls, t_patch, mask, it: int) -> dict:
        """Signals of a run that learns or collapses, for [CLS] and patch heads apart: output entropies
        (uniform = ln(out_dim)), the teacher-student KL, the centres' norms, the std across the batch
        of the L2-normalised teacher backbone [CLS] (near 0 = dimensional collapse; 1/sqrt(dim) for
        spread-out features) and the share of masked patches."""
        s = self.s
        st = float(s["student_temp"])
        tt, ptt = self.temperatures(it)

        def entropy(logp):
            return -(logp.exp() * logp).sum(-1).mean().item()

        t_logp = F.log_softmax((t_cls.float() - self.center) / tt, dim=-1)
        s_logp = F.log_softmax(s_cls.float() / st, dim=-1)
        tp_logp = F.log_softmax((t_patch.float() - self.patch_center) / ptt, dim=-1)[mask]
        sp_logp = F.log_softmax(s_patch.float() / st, dim=-1)
        kl_patch = (tp_logp.exp() * (tp_logp - sp_logp)).sum(-1).mean().item() if len(sp_logp) else float("nan")
        features = F.normalize(self.teacher.last_global_cls.float(), dim=-1)
        return {"uniform_entropy_cls": math.log(t_logp.shape[-1]), "uniform_entropy_patch": math.log(sp_logp.shape[-1]),
                "spread_feature_std": features.shape[-1] ** -0.5,
                "teacher_entropy_cls": entropy(t_logp), "student_entropy_cls": entropy(s_logp),
                "teacher_entropy_patch": entropy(tp_logp) if len(tp_logp) else float("nan"),
                "student_entropy_patch": entropy(sp_logp) if len(sp_logp) else float("nan"),
                "kl_patch": kl_patch, "center_norm": self.center.norm().item(),
                "patch_center_norm": self.patch_center.norm().item(),
                "feature_std": features.std(0).mean().item(), "masked_share": mask.float().mean().item()}

    # -- one step ---------------------------------------------------------------------------
    loss_keys = ("loss", "loss_cls", "loss_patch", "kl_cls", "kl_patch", "teacher_entropy_cls", "student_entropy_cls",
                 "teacher_entropy_patch", "student_entropy_patch", "center_norm", "patch_center_norm", "feature_std",
                 "masked_share", "uniform_entropy_cls", "uniform_entropy_patch", "spread_feature_std")
    last_keys = ("lr", "weight_decay", "momentum")

    def train_mode(self) -> None:
        self.student.train()
        self.teacher.eval()  # the teacher never uses drop path

    def step(self, batch, it: int, epoch: int) -> dict:
        """batch = (globals [B, 2, 1, G, G], locals [B, L, 1, l, l]) as produced by MultiCropDataset."""
        globals_, locals_ = multicrop_batch(batch, self.s, it, self.rank, self.device)
        s = self.s
        scheduled = self.opt.set_iteration(it)
        dev = self.device
        nb = dev.type == "cuda"
        B, V = globals_.shape[:2]
        g = globals_.to(dev, non_blocking=nb).transpose(0, 1).reshape(V * B, *globals_.shape[2:])
        loc = None
        if locals_ is not None and locals_.shape[1] > 0:
            L = locals_.shape[1]
            loc = locals_.to(dev, non_blocking=nb).transpose(0, 1).reshape(L * B, *locals_.shape[2:])
        grid = (g.shape[-2] // self.patch_size, g.shape[-1] // self.patch_size)
        with self.opt.autocast():
            with torch.no_grad():
                t_cls, t_patch, t_att = self.teacher(g, with_attention=(s["masking"] == "attmask_high"))
            mask = self.make_mask(V * B, grid, t_att, it)
            s_cls, s_patch, _ = self.student_ddp(g, loc, mask)
        loss_cls, loss_patch = self.loss(s_cls, s_patch, t_cls, t_patch, mask, V, it)
        loss = loss_cls + loss_patch
        health = self.health(s_cls, s_patch, t_cls, t_patch, mask, it)
        # The [CLS] loss is the cross-entropy over teacher-student view pairs: minus the teacher's
        # entropy it is their mean KL.
        health["kl_cls"] = loss_cls.item() - health["teacher_entropy_cls"]

        def freeze_last_layers():
            if epoch < int(s["freeze_last_layer"]):
                for p in (self.student.head.last_cls.weight, self.student.head.last_patch.weight):
                    p.grad = None

        self.opt.step(loss, it, freeze_last_layers)
        m = float(self.momentum_schedule[min(it, len(self.momentum_schedule) - 1)])
        ema_update(self.teacher, self.student, m)
        self.update_centers(t_cls, t_patch)
        return {"loss": loss.item(), "loss_cls": loss_cls.item(), "loss_patch": loss_patch.item(), **health,
                **scheduled, "momentum": m, "n_masked": int(mask.sum().item())}

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                **self.opt.state_dict(), "center": self.center.cpu(), "patch_center": self.patch_center.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.opt.load_state_dict(state)
        self.center.copy_(state["center"].to(self.device))
        self.patch_center.copy_(state["patch_center"].to(self.device))

    def export(self) -> dict:
        return self.student.backbone.state_dict()  # the student is used for inference


class MultiCropDataset(WindowDataset):
    """Item i -> (2 global crops [2, 1, G, G], local crops [L, 1, l, l]) of window i, float32;
    with augment_on: device the raw window [H, W] uint8 (multicrop_batch crops it)."""

    def __getitem__(self, i):
        s = self.s
        if on_device(s):
            return self.raw_window(i)
        rng = self.rng_for(i)
        win = self.window_at(int(i))
        g = [self.crop_input(rng, win, int(s["global_size"]), s["global_scale"], s["blur_p_global"])
             for _ in range(2)]
        loc = [self.crop_input(rng, win, int(s["local_size"]), s["local_scale"], s["blur_p_local"])
               for _ in range(int(s["n_local_crops"]))]
        local_t = torch.stack(loc) if loc else torch.zeros(0, 1, int(s["local_size"]), int(s["local_size"]))
        return torch.stack(g), local_t


def multicrop_batch(batch, s: dict, it: int, rank: int, device: torch.device):
    """(globals [B, 2, 1, G, G], locals [B, L, 1, l, l]) of a loader batch: as the workers made them,
    or, with augment_on: device, cropped and augmented on `device` from the raw windows [B, H, W]."""
    if not on_device(s):
        return batch
    augmenter = BatchAugmenter(batch, s, it, rank, device)
    return (augmenter.crops(2, int(s["global_size"]), s["global_scale"], s["blur_p_global"]),
            augmenter.crops(int(s["n_local_crops"]), int(s["local_size"]), s["local_scale"], s["blur_p_local"]))


def pretrain_attmask(page_masks: list[str], settings: dict, out_dir, *, device: str = "auto",
                     progress: bool = True, stop_after_epochs: int | None = None) -> dict:
    """AttMask on windows of binarized TRAIN pages -> out_dir/backbone.pt (student) and log.parquet."""
    s = _settings_with_defaults(settings)
    pages, index = page_windows(page_masks, s, progress)
    return train(MultiCropDataset(pages, index, s), s, out_dir,
                 lambda dev, niter, ws, rank, ddp: AttMaskTrainer(s, dev, niter, ws, rank, ddp),
                 device=device, progress=progress, stop_after_epochs=stop_after_epochs, cap=int(s["max_windows"]),
                 name="attmask")
