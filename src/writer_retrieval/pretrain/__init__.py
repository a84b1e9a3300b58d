"""Pretraining stage: self-supervised training of a feature extractor on the train split.

Methods (settings["method"]):
- `attmask` (attmask.py): AttMask student/teacher distillation of a ViT on page windows.
- `flip`, `rotation`, `jigsaw`, `sorting` (pretext.py): spatial-context pretext tasks, same ViT
  and windows.
- `saghog` (saghog.py): masked-HOG autoencoder on 32x32 patches at SIFT keypoints.
The epoch loop, checkpoint/resume, devices and DDP are shared (loop.py); window methods train
the backbone of backbone.py, which the embedding stage loads.
"""
from __future__ import annotations

from ..errors import InputError
from .attmask import (AttMaskTrainer, MultiCropDataset, attention_mask, block_mask, ema_update, n_masked,
                      pretrain_attmask, random_mask)
from .backbone import build_backbone, forward_tokens, last_block_cls_attention, load_backbone, resolve_device, to_input
from .loop import BACKBONE, CHECKPOINT, LOG_TABLE, cosine_schedule, load_pages
from .pretext import TASKS, pretrain_pretext

WINDOW_METHODS = {"attmask": pretrain_attmask, **{task: pretrain_pretext for task in TASKS}}
METHODS = (*WINDOW_METHODS, "saghog")


def pretrain(page_masks: list[str], settings: dict, out_dir, **options) -> dict:
    """Train a window-based method (AttMask or a pretext task) on binarized train pages."""
    method = settings.get("method")
    if method not in WINDOW_METHODS:
        raise InputError(f"pretrain: method {method!r} does not train on page windows; "
                         f"window methods: {', '.join(WINDOW_METHODS)}")
    return WINDOW_METHODS[method](page_masks, settings, out_dir, **options)


def run(inputs: dict, settings: dict, out_dir, **options) -> dict:
    """Any method: inputs = {"page_masks": [...]} for window methods, or
    {"patch_shards": [[patches.npy, index.parquet], ...], "doc_ids": [...]} for saghog."""
    method = settings.get("method")
    if method == "saghog":
        from .saghog import pretrain_saghog

        return pretrain_saghog(inputs["patch_shards"], inputs["doc_ids"], settings, out_dir, **options)
    return pretrain(inputs["page_masks"], settings, out_dir, **options)
