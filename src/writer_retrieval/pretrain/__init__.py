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
    if method == "none":
        return use_checkpoint(settings, out_dir)
    if method == "saghog":
        from .saghog import pretrain_saghog

        return pretrain_saghog(inputs["patch_shards"], inputs["doc_ids"], settings, out_dir, **options)
    return pretrain(inputs["page_masks"], settings, out_dir, **options)


# Where each method's trainer keeps the exported network in its checkpoint state.
_EXPORTED = {"attmask": ("student", "backbone."), "saghog": ("net", "encoder.")}


def use_checkpoint(settings: dict, out_dir) -> dict:
    """method none + init: a checkpoint used as it is (a zoo network, another run's backbone.pt),
    checked against the model settings, as out_dir/backbone.pt with an empty training log."""
    from pathlib import Path

    import pandas as pd
    import torch

    from ..storage import write_parquet
    from .loop import BACKBONE, CHECKPOINT, LOG_TABLE

    from ..vit import build_backbone, load_checked

    if settings["kind"] == "saghog":
        from .saghog import build_encoder, model_with_defaults

        net = build_encoder(model_with_defaults(settings["model"]))
    else:
        net = build_backbone(settings["model"])
    state = load_checked(net, settings["init"]).state_dict()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / BACKBONE)
    torch.save({"init": str(settings["init"]), "trainer": None}, out / CHECKPOINT)
    write_parquet(pd.DataFrame({"epoch": pd.Series(dtype="int64")}), out / LOG_TABLE)
    return {"epochs": 0, "init": str(settings["init"])}


def initial_weights(settings: dict) -> dict:
    """The network a run of `settings` starts from (its seeded random init): the untrained control."""
    if settings["method"] == "saghog":
        from .saghog import build_encoder, model_with_defaults

        return build_encoder(model_with_defaults(settings["model"]), seed=int(settings["seed"])).state_dict()
    from ..vit import build_backbone

    return build_backbone(settings["model"], seed=int(settings["seed"])).state_dict()


def trained_weights(checkpoint_path, method: str) -> dict:
    """The network a training checkpoint (checkpoint.pt) would export, as backbone.pt holds it."""
    import torch

    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["trainer"]
    part, prefix = _EXPORTED.get(method, ("net", "backbone."))
    return {k[len(prefix):]: v for k, v in state[part].items() if k.startswith(prefix)}
