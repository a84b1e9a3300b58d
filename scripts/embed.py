"""Glue for rule `embed_shard`: see writer_retrieval.embed.embed_shard."""
import torch

from writer_retrieval.embed import embed_shard
from writer_retrieval.logs import stage_logging

if __name__ == "__main__":
    sm = snakemake
    torch.set_num_threads(sm.threads)
    with stage_logging(sm.log[0], sm.rule):
        embed_shard(sm.input.index, sm.input.masks, int(sm.wildcards.shard), sm.params.shard_size,
                    dict(sm.params.settings), sm.input.backbone[0] if sm.input.backbone else None,
                    sm.output.tokens, sm.output.cls, sm.output.index, sm.output.stats, device=sm.params.device)
