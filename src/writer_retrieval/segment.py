"""Segment-Anything page/region extraction (the SAGHOG preprocessing), a preprocessing method.

Pipeline per page (docs methods.md, "Preprocessing"):

1. `edge_map`: gray -> 5x5 Gaussian blur -> Canny(150, 200) -> 3 channels. SAM sees the
   page's edges, not its paper texture, so the page and the background separate cleanly.
2. SAM's automatic mask generator on the edge map (`make_generator`: points_per_side 8,
   stability_score_thresh 0.8, box_nms_thresh 0.01, pred_iou_thresh 0.88 unless configured).
3. `select_region`: the page region from the masks (rules in its docstring).
4. `clean_page`: background outside the region set to paper (255), empty rows/columns cropped.
5. `segment_pages`: writes the cleaned page and the region mask per page and records a table
   with the writing-amount filter (SIFT keypoints / ink pixels) used to drop near-empty pages
   from pretraining (the table records it; nothing is deleted).

`combine_with_binarizer` gives the "sam+sauvola" ink mask: a binarizer's ink inside the region.

Models: vit_h / vit_l / vit_b are official SAM (package `segment_anything`); vit_t is MobileSAM
(package `mobile_sam`, TinyViT image encoder, same prompt encoder and mask decoder). Weights are
never downloaded: the user points `preprocess.sam.checkpoint` at a file (see `check_checkpoint`).

`build_sam(..., random_weights_for_testing=True)` is a testing-only switch (never the default,
never reached from configuration defaults): a tiny randomly initialised model, seeded, at a
small input size, so the whole SAM code path can be exercised on CPU in seconds.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from .binarize import binarize_page
from .errors import InputError
from .imaging import load_gray, write_gray, write_mask

log = logging.getLogger("writer_retrieval")

CHECKPOINT_KEY = "preprocess.sam.checkpoint"
MODEL_TYPE_KEY = "preprocess.sam.model_type"

# Accepted checkpoint files per model type (the names they are published under).
CHECKPOINT_FILES = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_t": "mobile_sam.pt",
}
MODEL_TYPES = tuple(CHECKPOINT_FILES)
MODEL_NAMES = {"vit_h": "SAM ViT-H", "vit_l": "SAM ViT-L", "vit_b": "SAM ViT-B", "vit_t": "MobileSAM (TinyViT)"}
# Image encoder width of the official SAM ViTs (first dim of image_encoder.patch_embed.proj.weight).
_EMBED_DIM_TO_TYPE = {1280: "vit_h", 1024: "vit_l", 768: "vit_b"}

SAM_SOURCES = (
    "SAM (vit_h / vit_l / vit_b): the 'Model Checkpoints' section of the segment-anything README "
    "by Meta AI (https://github.com/facebookresearch/segment-anything#model-checkpoints); "
    "MobileSAM (vit_t): weights/mobile_sam.pt in the MobileSAM GitHub repository "
    "(https://github.com/ChaoningZhang/MobileSAM)"
)

DEFAULT_SETTINGS = {
    "model_type": "vit_t",        # as the config default; SAGHOG used vit_h (SAM ViT-H)
    "checkpoint": None,
    "points_per_side": 8,
    "points_per_batch": 64,
    "pred_iou_thresh": 0.88,      # segment-anything's default; SAGHOG does not state one
    "stability_score_thresh": 0.8,
    "box_nms_thresh": 0.01,
    "large": 0.66,
    "keep": 0.10,
    "similar": 0.15,
    "min_keypoints": 1000,        # pages with fewer SIFT keypoints are dropped from pretraining
    "min_ink_pixels": 0,          # 0 = off
}

TABLE_COLUMNS = ["doc_id", "region_area_ratio", "kept", "reason", "seconds", "crop_y0", "crop_y1",
                 "crop_x0", "crop_x1", "n_masks", "ink_pixels", "n_keypoints"]


def _settings(settings: dict | None) -> dict:
    merged = dict(DEFAULT_SETTINGS)
    merged.update({k: v for k, v in (settings or {}).items() if v is not None or k == "checkpoint"})
    return merged


# --------------------------------------------------------------------------------------------
# Checkpoints and models
# --------------------------------------------------------------------------------------------

def _accepted_files() -> str:
    return ", ".join(f"{name} for {t}" for t, name in CHECKPOINT_FILES.items())


def _check_model_type(model_type: str) -> None:
    if model_type not in CHECKPOINT_FILES:
        raise InputError(
            f"unknown SAM model type {model_type!r} ({MODEL_TYPE_KEY}): choose one of "
            + ", ".join(f"{t} ({MODEL_NAMES[t]})" for t in MODEL_TYPES))


def check_checkpoint(model_type: str, checkpoint: str | os.PathLike | None) -> None:
    """Raise InputError unless `model_type` is known and `checkpoint` is a readable file.

    The message says which config key to set, which files are accepted and where they are
    usually obtained. Nothing is downloaded. Whether the file's weights fit the model is
    checked when it is loaded (`build_sam`).
    """
    _check_model_type(model_type)
    expected = CHECKPOINT_FILES[model_type]
    help_text = (f"Set {CHECKPOINT_KEY} to the path of a local checkpoint file for model_type {model_type} "
                 f"(expected {expected}; accepted: {_accepted_files()}). They are usually obtained from "
                 f"{SAM_SOURCES}. Nothing is downloaded automatically.")
    if checkpoint is None or str(checkpoint).strip() == "":
        raise InputError(f"SAM preprocessing needs a model checkpoint, but {CHECKPOINT_KEY} is not set. {help_text}")
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise InputError(f"SAM checkpoint {str(path)!r} ({CHECKPOINT_KEY}) does not exist. {help_text}")
    if not path.is_file():
        raise InputError(f"SAM checkpoint {str(path)!r} ({CHECKPOINT_KEY}) is not a file. {help_text}")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise InputError(f"SAM checkpoint {str(path)!r} ({CHECKPOINT_KEY}) is not readable "
                         f"({exc.strerror or exc}). {help_text}") from exc


def _import_segment_anything():
    import segment_anything
    return segment_anything


def _import_mobile_sam():
    # mobile_sam imports deprecated timm paths and re-registers TinyViT names: harmless noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mobile_sam
    return mobile_sam


def guess_model_type(state_dict: dict) -> str | None:
    """vit_h / vit_l / vit_b / vit_t from a state dict's tensor shapes and names, or None."""
    proj = state_dict.get("image_encoder.patch_embed.proj.weight")
    if proj is not None and hasattr(proj, "shape") and len(proj.shape) == 4:
        return _EMBED_DIM_TO_TYPE.get(int(proj.shape[0]))
    if any(k.startswith(("image_encoder.layers.", "image_encoder.patch_embed.seq.")) for k in state_dict):
        return "vit_t"
    return None


def _describe_guess(state_dict: dict) -> str:
    guess = guess_model_type(state_dict)
    if guess is not None:
        return (f"is it a {guess} checkpoint ({MODEL_NAMES[guess]}, {CHECKPOINT_FILES[guess]})? "
                f"Then set {MODEL_TYPE_KEY}: {guess}")
    proj = state_dict.get("image_encoder.patch_embed.proj.weight")
    if proj is not None and hasattr(proj, "shape"):
        return (f"its ViT image encoder has embed dim {int(proj.shape[0])}, which is none of the official SAM "
                f"sizes (1280 vit_h, 1024 vit_l, 768 vit_b)")
    return "it does not look like a SAM or MobileSAM checkpoint (no image_encoder weights of a known layout)"


def _load_state_dict_file(path: Path, model_type: str) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, "invalid load key", disallowed globals...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(
            f"SAM checkpoint {str(path)!r} ({CHECKPOINT_KEY}) could not be read as PyTorch weights "
            f"({type(exc).__name__}: {first[:200]}); expected {CHECKPOINT_FILES[model_type]} for model_type "
            f"{model_type} (accepted: {_accepted_files()}; usually obtained from {SAM_SOURCES})") from exc
    # Unwrap common training-checkpoint layouts.
    for _ in range(2):
        if isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
            inner = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items()):
        raise InputError(f"SAM checkpoint {str(path)!r} ({CHECKPOINT_KEY}) does not contain a state dict "
                         f"(a mapping of parameter names to tensors); expected {CHECKPOINT_FILES[model_type]} "
                         f"for model_type {model_type}")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _expected_shapes(model_type: str) -> dict:
    """Parameter name -> shape of the full-size model, without allocating its weights where possible."""
    import torch

    if model_type == "vit_t":  # TinyViT calls .item() at construction (no meta device); it is small anyway
        model = _import_mobile_sam().sam_model_registry["vit_t"]()
    else:
        with torch.device("meta"):
            model = _import_segment_anything().sam_model_registry[model_type]()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_fits(state_dict: dict, model_type: str, path: Path) -> None:
    expected = _expected_shapes(model_type)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{len(missing)} missing / {len(unexpected)} unexpected keys"]
    if mismatched:
        k = mismatched[0]
        parts.append(f"{len(mismatched)} with a different shape (first: {k} is "
                     f"{tuple(state_dict[k].shape)}, the model wants {expected[k]})")
    firsts = []
    if missing:
        firsts.append(f"first missing: {missing[0]}")
    if unexpected:
        firsts.append(f"first unexpected: {unexpected[0]}")
    detail = ", ".join(parts) + (f" ({'; '.join(firsts)})" if firsts else "")
    guess = guess_model_type(state_dict)
    if guess == model_type:
        hint = (f"its shapes look like {model_type}, but the file differs from the {MODEL_NAMES[model_type]} "
                f"model of the installed package: is it truncated, fine-tuned with extra layers, or from "
                f"another SAM variant? The official file is {CHECKPOINT_FILES[model_type]}")
    else:
        hint = _describe_guess(state_dict)
    raise InputError(f"SAM checkpoint {str(path)!r} ({CHECKPOINT_KEY}) does not fit model_type {model_type}: "
                     f"{detail}; {hint}")


def _tinyvit_any_size_class():
    """TinyViT whose neck reshape follows img_size (MobileSAM's hard-codes the 64x64 grid of 1024 px)."""
    mobile_sam = _import_mobile_sam()
    TinyViT, LayerNorm2d = mobile_sam.modeling.TinyViT, mobile_sam.modeling.common.LayerNorm2d

    class TinyViTAnySize(TinyViT):
        def __init__(self, *args, out_chans: int = 256, **kwargs):
            super().__init__(*args, **kwargs)
            import torch.nn as nn

            width = kwargs["embed_dims"][-1]
            self.neck = nn.Sequential(nn.Conv2d(width, out_chans, kernel_size=1, bias=False), LayerNorm2d(out_chans),
                                      nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
                                      LayerNorm2d(out_chans))

        def forward_features(self, x):
            x = self.patch_embed(x)
            for layer in self.layers:
                x = layer(x)
            b, _, c = x.size()
            side = self.img_size // 16
            x = x.view(b, side, side, c).permute(0, 3, 1, 2)
            return self.neck(x)

    return TinyViTAnySize


# The testing model's sizes (see build_sam).
_TEST_PROMPT_DIM = 64
_TEST_LOGIT_SCALE = 300.0
# Seed 1 gives both test models (vit_b-style and vit_t) masks of varied sizes on synthetic pages;
# with seed 0 the vit_t one predicts only empty masks.
_TEST_SEED = 1


def _tiny_random_sam(model_type: str, image_size: int):
    """The testing-only model: tiny image encoder, prompt encoder and mask decoder, random weights."""
    import torch

    if image_size % 16 or image_size < 64:
        raise ValueError(f"image_size for the random-weights test model must be a multiple of 16 and >= 64, "
                         f"got {image_size}")
    emb = image_size // 16
    dim = _TEST_PROMPT_DIM
    pkg = _import_mobile_sam() if model_type == "vit_t" else _import_segment_anything()
    m = pkg.modeling
    if model_type == "vit_t":
        encoder = _tinyvit_any_size_class()(
            img_size=image_size, in_chans=3, num_classes=1000,
            # last width 320 keeps MobileSAM's stride-1 final merge, so the output grid is image_size / 16
            embed_dims=[32, 64, 128, 320], depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 5],
            window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
            use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
            out_chans=dim)
    else:
        encoder = m.ImageEncoderViT(
            depth=2, embed_dim=64, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=4, patch_size=16, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=[1], window_size=8, out_chans=dim)
    sam = m.Sam(
        image_encoder=encoder,
        prompt_encoder=m.PromptEncoder(embed_dim=dim, image_embedding_size=(emb, emb),
                                       input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=256, num_heads=8),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    with torch.no_grad():
        # Random transposed-conv kernels paint a checkerboard into every mask, which makes masks
        # with tens of thousands of runs (slow RLE encoding, nothing like SAM's blobs): make each
        # kernel spatially constant (nearest-neighbour-like upsampling).
        for mod in sam.mask_decoder.output_upscaling:
            if isinstance(mod, torch.nn.ConvTranspose2d):
                mod.weight.copy_(mod.weight.mean(dim=(2, 3), keepdim=True).expand_as(mod.weight))
        # Random logits are tiny (|x| < 0.1), so every mask fails the stability score (which
        # thresholds at +-1): scale the hypernetworks' output so logits reach SAM-like +-10.
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(_TEST_LOGIT_SCALE)
            mlp.layers[-1].bias.mul_(_TEST_LOGIT_SCALE)
        # Predicted IoU around 0.9, so masks meet the production default pred_iou_thresh 0.88
        # about half the time and the stability / NMS filters after it see real work.
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.fill_(0.9)
    return sam


def build_sam(model_type: str, checkpoint: str | os.PathLike | None, device: str = "cpu", *,
              random_weights_for_testing: bool = False, image_size: int | None = None,
              seed: int = _TEST_SEED):
    """A SAM / MobileSAM model in eval mode on `device`, weights from `checkpoint`.

    vit_h / vit_l / vit_b come from `segment_anything.sam_model_registry`, vit_t from
    `mobile_sam.sam_model_registry`. The model is built without weights and the state dict is
    loaded here (torch.load, map_location cpu, weights_only=True), so a checkpoint of the wrong
    kind raises InputError ("... does not fit model_type ...: N missing / M unexpected keys ...;
    is it a vit_b checkpoint?") instead of a state-dict stack trace.

    random_weights_for_testing=True is a TESTING-ONLY switch and never the default: no
    checkpoint (passing one is an error), seeded random initialisation (`seed`, torch's global
    RNG left untouched), and a tiny model at input size `image_size` (default 256) with an
    embedding grid of image_size // 16:
    - image encoder, vit_h / vit_l / vit_b: segment_anything ImageEncoderViT, depth 2, embed
      dim 64, 4 heads, patch 16, window 8, block 1 global attention, relative positions;
      vit_t: mobile_sam TinyViT, widths 32/64/128/320, one block per stage, MobileSAM's window
      sizes, its neck reshape following image_size;
    - prompt encoder and mask decoder of the same package at width 64 (two-way transformer
      depth 2, 8 heads, MLP 256; 3 multimask outputs; IoU head hidden 64);
    - three tweaks so random masks behave like masks: the decoder's transposed-conv kernels
      are made spatially constant (blobs, not checkerboards), the hypernetworks' output layer
      is scaled by 300 (logits of SAM-like magnitude, so the stability score is not always 0)
      and the IoU head's output bias is 0.9 (some masks meet the default pred_iou_thresh 0.88).
    Its masks are meaningless; it exists so tests run the real prompting, batching and mask
    post-processing code (and the selection and output code after it) quickly on CPU.
    """
    import torch

    _check_model_type(model_type)
    if random_weights_for_testing:
        if checkpoint is not None:
            raise ValueError("random_weights_for_testing builds an untrained model: pass checkpoint=None")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sam = _tiny_random_sam(model_type, int(image_size or 256))
    else:
        if image_size is not None:
            raise ValueError("image_size is only for random_weights_for_testing; real checkpoints use 1024")
        check_checkpoint(model_type, checkpoint)
        path = Path(checkpoint).expanduser()
        state_dict = _load_state_dict_file(path, model_type)
        _check_fits(state_dict, model_type, path)
        registry = (_import_mobile_sam() if model_type == "vit_t" else _import_segment_anything()).sam_model_registry
        sam = registry[model_type](checkpoint=None)
        try:
            sam.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:  # should have been caught by _check_fits; keep it user-facing
            raise InputError(f"SAM checkpoint {str(path)!r} ({CHECKPOINT_KEY}) does not fit model_type "
                             f"{model_type}: {str(exc).splitlines()[0]}; {_describe_guess(state_dict)}") from exc
    sam.to(device)
    # eval() after loading and moving: MobileSAM's TinyViT attention caches its biases ('ab')
    # when switched to eval mode, so the cache must be built from the loaded weights.
    sam.eval()
    return sam


def make_generator(sam, settings: dict | None = None):
    """SamAutomaticMaskGenerator of the package the model comes from (mobile_sam for vit_t)."""
    s = _settings(settings)
    if type(sam).__module__.startswith("mobile_sam"):
        generator_class = _import_mobile_sam().SamAutomaticMaskGenerator
    else:
        generator_class = _import_segment_anything().SamAutomaticMaskGenerator
    return generator_class(
        sam,
        points_per_side=int(s["points_per_side"]),
        points_per_batch=int(s["points_per_batch"]),
        pred_iou_thresh=float(s["pred_iou_thresh"]),
        stability_score_thresh=float(s["stability_score_thresh"]),
        box_nms_thresh=float(s["box_nms_thresh"]),
        output_mode="binary_mask",
    )


# --------------------------------------------------------------------------------------------
# Region selection and cleaning (plain numpy)
# --------------------------------------------------------------------------------------------

def _touches_all_borders(seg: np.ndarray) -> bool:
    return bool(seg[0].any() and seg[-1].any() and seg[:, 0].any() and seg[:, -1].any())


def _pct(value: float) -> str:
    return f"{value * 100:g}%"


def select_region(masks: list[dict], height: int, width: int, *, large: float = 0.66, keep: float = 0.10,
                  similar: float = 0.15) -> tuple[np.ndarray, str]:
    """The page region (bool, height x width) from SAM-style masks, and the reason it was chosen.

    `masks`: dicts with 'segmentation' (bool height x width); 'area' and 'bbox' may be present
    but areas are recounted from the segmentation (it may be inverted). Fractions are of the
    image area height * width. Rules, in this order:

    1. Background inversion: a mask touching all four image borders (a True pixel in the first
       and last row and column) is background around the page and is replaced by its
       complement, unless the complement covers less than `keep` (then the mask fills the scan
       edge to edge: it is the page itself and is used as is). Empty masks are dropped.
    2. Masks are sorted by area, largest first (ties keep their input order).
    3. No masks left: the page is kept whole ("SAM returned no masks: page kept whole", or
       "SAM returned only empty masks: page kept whole").
    4. The two largest both cover more than `keep` and their areas are within `similar` of
       each other (smaller >= (1 - similar) * larger): their union (e.g. the two pages of a
       spread, or two nested outlines of one page).
    5. Otherwise the largest mask, when it covers more than `large`.
    6. Otherwise the union of all masks covering more than `keep`.
    7. Otherwise the page is kept whole ("no mask covers more than 10% of the page: page kept
       whole").
    When an inverted mask is part of the region, the reason ends with
    " (background mask touching all four borders inverted)". Reason strings depend only on the
    rule taken and the thresholds, so they can be grouped and counted.
    """
    height, width = int(height), int(width)
    total = float(height * width)
    prepared = []  # (area, input order, seg, inverted)
    for i, m in enumerate(masks):
        seg = np.asarray(m["segmentation"], dtype=bool)
        if seg.shape != (height, width):
            raise ValueError(f"mask {i} has shape {seg.shape}, expected {(height, width)}")
        inverted = False
        if _touches_all_borders(seg) and (total - np.count_nonzero(seg)) / total >= keep:
            seg = ~seg
            inverted = True
        area = int(np.count_nonzero(seg))
        if area:
            prepared.append((area, i, seg, inverted))
    prepared.sort(key=lambda t: (-t[0], t[1]))

    whole = np.ones((height, width), dtype=bool)
    if not prepared:
        return whole, ("SAM returned only empty masks: page kept whole" if len(masks)
                       else "SAM returned no masks: page kept whole")

    def done(chosen, reason):
        region = np.zeros((height, width), dtype=bool)
        for _, _, seg, _ in chosen:
            region |= seg
        if any(inv for *_, inv in chosen):
            reason += " (background mask touching all four borders inverted)"
        return region, reason

    frac = [a / total for a, *_ in prepared]
    if len(prepared) >= 2 and frac[1] > keep and prepared[1][0] >= (1.0 - similar) * prepared[0][0]:
        return done(prepared[:2], f"union of the two largest masks (areas within {_pct(similar)} of each other)")
    if frac[0] > large:
        return done(prepared[:1], f"largest mask covers more than {_pct(large)} of the page")
    chosen = [p for p, f in zip(prepared, frac) if f > keep]
    if chosen:
        return done(chosen, f"no mask covers more than {_pct(large)}: union of the masks covering more than "
                            f"{_pct(keep)}")
    return whole, f"no mask covers more than {_pct(keep)} of the page: page kept whole"


def clean_page(gray: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Background outside `region` set to paper and the page cropped to the region.

    Pages are 8-bit gray with white paper (255) and dark ink, so "zeroing" the background (as
    SAGHOG does on ink-bright images) means setting it to 255 here: it then reads as empty paper
    to the binarizers and feature extractors. Returns the cropped, cleaned page and the crop
    box (y0, y1, x0, x1) in page coordinates, end-exclusive: cleaned = page[y0:y1, x0:x1].
    """
    gray = np.asarray(gray)
    region = np.asarray(region, dtype=bool)
    if gray.shape[:2] != region.shape:
        raise ValueError(f"region shape {region.shape} differs from the page's {gray.shape[:2]}")
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    if not len(rows):
        raise ValueError("empty region: nothing of the page would be kept")
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    cleaned = np.where(region[..., None] if gray.ndim == 3 else region, gray, np.uint8(255)).astype(gray.dtype)
    return np.ascontiguousarray(cleaned[y0:y1, x0:x1]), (y0, y1, x0, x1)


def edge_map(gray: np.ndarray) -> np.ndarray:
    """The SAGHOG input to SAM: gray -> 5x5 Gaussian blur -> Canny(150, 200) -> H x W x 3 uint8."""
    gray = np.asarray(gray, dtype=np.uint8)
    edges = cv2.Canny(cv2.GaussianBlur(gray, (5, 5), 0), 150, 200)
    return np.ascontiguousarray(np.repeat(edges[:, :, None], 3, axis=2))


def combine_with_binarizer(gray: np.ndarray, region: np.ndarray, binarize_settings: dict) -> np.ndarray:
    """"sam+sauvola": the binarizer's ink (computed on the full page) inside the SAM region."""
    region = np.asarray(region, dtype=bool)
    if np.shape(gray)[:2] != region.shape:
        raise ValueError(f"region shape {region.shape} differs from the page's {np.shape(gray)[:2]}")
    ink, _ = binarize_page(gray, binarize_settings)
    return ink & region


# --------------------------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------------------------

def segment_page(gray: np.ndarray, generator_or_model, settings: dict | None = None) -> dict:
    """Region, cleaned page and bookkeeping for one 8-bit gray page.

    `generator_or_model`: a SamAutomaticMaskGenerator (reuse one across pages) or a Sam model
    (a generator is made from `settings`). Returns dict(region (bool, page size), cleaned
    (cropped gray), box (y0, y1, x0, x1), reason, n_masks, seconds).
    """
    s = _settings(settings)
    start = time.perf_counter()
    generator = generator_or_model
    if not hasattr(generator, "generate"):
        generator = make_generator(generator_or_model, s)
    gray = np.asarray(gray, dtype=np.uint8)
    masks = generator.generate(edge_map(gray))
    region, reason = select_region(masks, gray.shape[0], gray.shape[1], large=s["large"], keep=s["keep"],
                                   similar=s["similar"])
    cleaned, box = clean_page(gray, region)
    return {"region": region, "cleaned": cleaned, "box": box, "reason": reason, "n_masks": len(masks),
            "seconds": time.perf_counter() - start}


def count_keypoints(gray: np.ndarray) -> int:
    """SIFT keypoints on a gray page (the writing-amount measure of SAGHOG)."""
    return len(cv2.SIFT_create().detect(np.asarray(gray, dtype=np.uint8), None))


def count_ink_pixels(gray: np.ndarray) -> int:
    """Otsu ink pixels; a uniform page has none."""
    gray = np.asarray(gray, dtype=np.uint8)
    if gray.size == 0 or gray.min() == gray.max():
        return 0
    ink, _ = binarize_page(gray, {"method": "otsu"})
    return int(np.count_nonzero(ink))


def _row_fields(row: Any) -> tuple[str, str]:
    if isinstance(row, dict):
        return str(row["doc_id"]), str(row["path"])
    return str(row.doc_id), str(row.path)


def segment_pages(rows: Iterable, settings: dict | None, pages_dir: str | os.PathLike,
                  regions_dir: str | os.PathLike, *, device: str = "auto",
                  random_weights_for_testing: bool = False) -> pd.DataFrame:
    """Segment every page; write pages_dir/{doc_id}.png and regions_dir/{doc_id}.png.

    `rows`: a DataFrame or an iterable of records/dicts with doc_id and path. `settings`: the
    preprocess.sam section (model_type, checkpoint, generator thresholds, min_keypoints,
    min_ink_pixels; defaults in DEFAULT_SETTINGS). The model is built once. pages/ holds the
    cleaned, cropped gray page, regions/ the region mask at full page size (1-bit PNG, region = 1).

    Returns one row per page: doc_id, region_area_ratio (region pixels / page pixels), kept,
    reason, seconds (whole page: load, SAM, selection, filter, writes), crop_y0/y1/x0/x1 (the
    crop box, end-exclusive), n_masks, ink_pixels (Otsu on the cleaned page), n_keypoints (SIFT
    on the cleaned page). kept is False when the page has fewer than min_keypoints keypoints
    or fewer than min_ink_pixels ink pixels (too little writing for pretraining); the reason
    then says so. Nothing is deleted.

    random_weights_for_testing: see `build_sam` (testing only; settings["image_size"] sets the
    tiny model's input size, default 256).
    """
    from .devices import resolve_device  # not at the top: it imports torch, and config validation imports this module

    s = _settings(settings)
    if isinstance(rows, pd.DataFrame):
        rows = list(rows.itertuples(index=False))
    else:
        rows = list(rows)
    device = str(resolve_device(device))
    model_type = s["model_type"]
    if random_weights_for_testing:
        sam = build_sam(model_type, None, device, random_weights_for_testing=True,
                        image_size=s.get("image_size"), seed=int(s.get("seed", _TEST_SEED)))
    else:
        check_checkpoint(model_type, s["checkpoint"])
        sam = build_sam(model_type, s["checkpoint"], device)
    generator = make_generator(sam, s)
    min_kp, min_ink = int(s["min_keypoints"]), int(s["min_ink_pixels"])

    records = []
    for row in tqdm(rows, total=len(rows), desc=f"SAM {model_type} regions", unit="page", mininterval=2):
        start = time.perf_counter()
        doc_id, path = _row_fields(row)
        gray = load_gray(path)
        result = segment_page(gray, generator, s)
        cleaned, region, (y0, y1, x0, x1) = result["cleaned"], result["region"], result["box"]
        n_keypoints = count_keypoints(cleaned)
        ink_pixels = count_ink_pixels(cleaned)
        reason = result["reason"]
        drops = []
        if n_keypoints < min_kp:
            drops.append(f"fewer than {min_kp} SIFT keypoints")
        if ink_pixels < min_ink:
            drops.append(f"fewer than {min_ink} ink pixels")
        if drops:
            reason += "; too little writing: " + " and ".join(drops)
        write_gray(Path(pages_dir) / f"{doc_id}.png", cleaned)
        write_mask(Path(regions_dir) / f"{doc_id}.png", region)
        records.append({
            "doc_id": doc_id, "region_area_ratio": float(region.mean()), "kept": not drops, "reason": reason,
            "seconds": time.perf_counter() - start, "crop_y0": y0, "crop_y1": y1, "crop_x0": x0, "crop_x1": x1,
            "n_masks": int(result["n_masks"]), "ink_pixels": ink_pixels, "n_keypoints": n_keypoints,
        })
    table = pd.DataFrame(records, columns=TABLE_COLUMNS)
    table = table.astype({"doc_id": str, "region_area_ratio": float, "kept": bool, "reason": str, "seconds": float,
                          "crop_y0": "int64", "crop_y1": "int64", "crop_x0": "int64", "crop_x1": "int64",
                          "n_masks": "int64", "ink_pixels": "int64", "n_keypoints": "int64"})
    if len(table):
        log.info("SAM %s: %d pages, %d kept, mean region %.3f of the page, %.2f s/page", model_type, len(table),
                 int(table["kept"].sum()), table["region_area_ratio"].mean(), table["seconds"].mean())
    return table
