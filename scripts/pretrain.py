"""Glue for rule `pretrain`: see writer_retrieval.pretrain.run (torchrun for several GPUs)."""
import subprocess
import sys

import pandas as pd
import torch

from writer_retrieval.jobs import resumable_run, stage_job
from writer_retrieval.pretrain import run
from writer_retrieval.storage import write_json


def training_inputs(sm, log) -> dict:
    """Train pages (SAM's writing-amount filter applied), as page masks or as patch shards."""
    index = pd.read_parquet(sm.input.index)
    train_ids = index.loc[index.split == "train", "doc_id"]
    if sm.input.segments:
        kept = pd.read_parquet(sm.input.segments[0]).set_index("doc_id").kept
        train_ids = train_ids[kept.loc[train_ids].to_numpy()]
        log.info("pretraining on %d train pages with enough writing (SAM filter)", len(train_ids))
    if sm.input.patches:
        return {"patch_shards": [list(p) for p in zip(sm.input.patches, sm.input.shard_index)],
                "doc_ids": train_ids.tolist()}
    masks = pd.read_parquet(sm.input.masks).set_index("doc_id")
    return {"page_masks": masks.loc[train_ids, "mask_path"].tolist()}


if __name__ == "__main__":
    sm = snakemake
    torch.set_num_threads(sm.threads)
    with stage_job(sm, "pretrain") as job:
        settings, device, gpus = job.settings, job.settings["device"], job.settings["gpus"]
        # method none (init used as it is) reads no training data
        inputs = training_inputs(sm, job.log) if settings["method"] != "none" else {}
        write_json({"inputs": inputs, "settings": settings, "device": device}, sm.output.inputs)
        outputs = [sm.output.backbone, sm.output.log, sm.output.checkpoint]
        with resumable_run(sm.params.out_dir, outputs) as scratch:
            if gpus > 1:
                subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}",
                                "-m", "writer_retrieval.pretrain", "--job", sm.output.inputs, "--out", str(scratch)],
                               check=True)
            else:
                run(inputs, settings, scratch, device=device)
