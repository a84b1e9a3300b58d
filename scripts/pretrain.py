"""Glue for rule `pretrain`: see writer_retrieval.pretrain.run (torchrun for several GPUs)."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from writer_retrieval.logs import stage_logging
from writer_retrieval.pretrain import run

if __name__ == "__main__":
    sm = snakemake
    torch.set_num_threads(sm.threads)
    with stage_logging(sm.log[0], sm.rule) as log:
        index = pd.read_parquet(sm.input.index)
        train_ids = index.loc[index.split == "train", "doc_id"]
        if sm.input.segments:
            kept = pd.read_parquet(sm.input.segments[0]).set_index("doc_id").kept
            train_ids = train_ids[kept.loc[train_ids].to_numpy()]
            log.info("pretraining on %d train pages with enough writing (SAM filter)", len(train_ids))
        if sm.input.patches:
            inputs = {"patch_shards": [list(p) for p in zip(sm.input.patches, sm.input.shard_index)],
                      "doc_ids": train_ids.tolist()}
        else:
            masks = pd.read_parquet(sm.input.masks).set_index("doc_id")
            inputs = {"page_masks": masks.loc[train_ids, "mask_path"].tolist()}
        settings = {k: v for k, v in sm.params.settings.items() if k not in ("binarize", "segment", "patches")}
        if sm.params.gpus > 1:
            out = Path(sm.params.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "inputs.json").write_text(json.dumps(inputs))
            (out / "settings.json").write_text(json.dumps(settings))
            subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={sm.params.gpus}",
                            "-m", "writer_retrieval.pretrain", "--inputs", str(out / "inputs.json"),
                            "--settings", str(out / "settings.json"), "--out", str(out), "--device", sm.params.device],
                           check=True)
        else:
            run(inputs, settings, sm.params.out_dir, device=sm.params.device)
