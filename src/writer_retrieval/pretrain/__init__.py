"""Pretraining stage: self-supervised training of a feature extractor on the train split.

Methods (settings["method"]):
- `attmask` (attmask.py): AttMask student/teacher distillation of a ViT on page windows.
- `flip`, `rotation`, `jigsaw`, `sorting` (pretext.py): spatial-context pretext tasks, same ViT
  and windows.
- `saghog` (saghog.py): masked-HOG autoencoder on 32x32 patches at SIFT keypoints.
The epoch loop, checkpoint/resume, devices and DDP are shared (loop.py); window methods train
the backbone of ../vit.py, which the embedding stage loads.

This file imports no method when the package loads: the fine-tuning and patch-embedding stages
import loop.py and saghog.py, which runs this file first, and must not load (nor, in their code
version, depend on) the other methods. The names re-exported here are imported on first use.
"""
from __future__ import annotations

import functools

from ..errors import InputError


@functools.cache
def _exports() -> dict:
    """Every name re-exported by this package (the imports below and the method tables)."""
    from ..devices import resolve_device
    from ..vit import build_backbone, forward_tokens, last_block_cls_attention, load_backbone, to_input
    from .attmask import (AttMaskTrainer, MultiCropDataset, attention_mask, block_mask, ema_update, n_masked,
                          pretrain_attmask, random_mask)
    from .loop import BACKBONE, CHECKPOINT, LOG_TABLE, cosine_schedule, load_pages
    from .pretext import TASKS, pretrain_pretext

    WINDOW_METHODS = {"attmask": pretrain_attmask, **{task: pretrain_pretext for task in TASKS}}
    METHODS = (*WINDOW_METHODS, "saghog")
    return dict(locals())


def __getattr__(name: str):
    """PEP 562: `pretrain.build_backbone` and the like import their module on first access."""
    exports = _exports()
    if name in exports:
        return exports[name]
    if name in globals():  # a submodule that _exports() has just imported (pretrain.attmask)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pretrain(page_masks: list[str], settings: dict, out_dir, **options) -> dict:
    """Train a window-based method (AttMask or a pretext task) on binarized train pages."""
    methods = _exports()["WINDOW_METHODS"]
    method = settings.get("method")
    if method not in methods:
        raise InputError(f"pretrain: method {method!r} does not train on page windows; "
                         f"window methods: {', '.join(methods)}")
    return methods[method](page_masks, settings, out_dir, **options)


def run(inputs: dict, settings: dict, out_dir, **options) -> dict:
    """Any method: inputs = {"page_masks": [...]} for window methods, or
    {"patch_shards": [[patches.npy, index.parquet], ...], "doc_ids": [...]} for saghog."""
    method = settings.get("method")
    if method == "saghog":
        from .saghog import pretrain_saghog

        return pretrain_saghog(inputs["patch_shards"], inputs["doc_ids"], settings, out_dir, **options)
    return pretrain(inputs["page_masks"], settings, out_dir, **options)
