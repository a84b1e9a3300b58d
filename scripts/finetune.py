"""Glue for rule `finetune`: see writer_retrieval.finetune.finetune."""
import torch

from writer_retrieval.finetune import finetune
from writer_retrieval.logs import stage_logging

if __name__ == "__main__":
    sm = snakemake
    torch.set_num_threads(sm.threads)
    with stage_logging(sm.log[0], sm.rule):
        finetune([list(p) for p in zip(sm.input.patches, sm.input.shard_index)], sm.input.labels, sm.input.backbone,
                 dict(sm.params.model), dict(sm.params.settings), sm.params.out_dir, device=sm.params.device)
