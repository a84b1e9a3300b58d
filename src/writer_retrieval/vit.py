"""The ViT backbone every window-based pretraining method trains and the embedding stage loads.

A top-level module, not part of the pretrain package, so that the embedding stage (and its code
version) depends on the network alone, not on the training methods.

Input convention shared with the embedding stage: `to_input` (ink = 1.0, paper = 0.0, float32,
shape [1, H, W]); `build_backbone` (timm ViT, in_chans 1, random init, a learnable
`mask_token` for masked image modelling, saved in backbone.pt); `forward_tokens` (final-norm
tokens, [CLS] first).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .devices import resolve_device
from .errors import InputError


def to_input(window: np.ndarray) -> torch.Tensor:
    """A window (bool ink mask, or float with ink = 1.0) as the network input [1, H, W] float32."""
    arr = np.asarray(window)
    if arr.ndim != 2:
        raise ValueError(f"to_input expects a 2-D window, got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]


def build_backbone(model: dict, seed: int | None = None, drop_path: float = 0.0, init=None) -> nn.Module:
    """A timm VisionTransformer with in_chans=1, no classifier, dynamic image size, no weights
    downloaded; plus a learnable `mask_token` (1, embed_dim) used by masked image modelling.
    drop_path: stochastic depth, a training setting (it has no parameters and is off in eval mode).
    init: a local checkpoint (a backbone.pt) to start from instead of the random init."""
    import timm

    for key in ("arch", "img_size", "patch_size"):
        if key not in model:
            raise InputError(f"model settings: missing key '{key}' (have {sorted(model)})")
    kwargs = dict(pretrained=False, num_classes=0, in_chans=1, img_size=model["img_size"],
                  patch_size=model["patch_size"], drop_path_rate=float(drop_path),
                  dynamic_img_size=True)
    for key in ("embed_dim", "depth", "num_heads"):
        if model.get(key) is not None:
            kwargs[key] = model[key]
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        net = timm.create_model(model["arch"], **kwargs)
    if getattr(net, "cls_token", None) is None or not hasattr(net, "blocks"):
        raise InputError(f"model arch {model['arch']!r}: pretraining needs a ViT with a [CLS] token")
    net.mask_token = nn.Parameter(torch.zeros(1, net.embed_dim))
    return net if init is None else load_checked(net, init)


def load_backbone(path, model: dict, device="cpu") -> nn.Module:
    """The student backbone saved by `pretrain` (backbone.pt), in eval mode on `device`."""
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    return build_backbone(model, init=path).to(dev).eval()


def _listed(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_checked(net: nn.Module, path) -> nn.Module:
    """Load a state_dict file into `net`; a file that does not fit the architecture is an InputError
    that names the file and the mismatch (missing / unexpected keys, shapes), not a torch traceback."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which
        raise InputError(f"checkpoint {path}: not a PyTorch state_dict ({exc})") from None
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path}: holds a {type(state).__name__}, not a state_dict")
    expected = net.state_dict()
    problems = []
    if missing := sorted(set(expected) - set(state)):
        problems.append(f"missing {_listed(missing)}")
    if unexpected := sorted(set(state) - set(expected)):
        problems.append(f"unexpected {_listed(unexpected)}")
    shapes = [f"{k} {tuple(state[k].shape)} where the model has {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        problems.append(f"shape of {_listed(shapes, 2)}")
    if problems:
        raise InputError(f"checkpoint {path} does not fit the model settings: {'; '.join(problems)}")
    net.load_state_dict(state)
    return net


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
