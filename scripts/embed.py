"""Glue for the ViT embedding rules: see writer_retrieval.embed.embed_shard (the SAGHOG patch
embedding has its own script, embed_patches.py, so that each has its own code version)."""
import torch

from writer_retrieval.embed import embed_shard
from writer_retrieval.storage import merge_stats
from writer_retrieval.jobs import stage_job

if __name__ == "__main__":
    sm = snakemake
    torch.set_num_threads(sm.threads)
    with stage_job(sm, "embed") as job:
        if sm.rule == "embed_shard":
            embed_shard(sm.input.index, sm.input.masks, int(sm.wildcards.shard), sm.params.shard_size, job.settings,
                        sm.input.backbone[0] if sm.input.backbone else None, sm.output.tokens, sm.output.cls,
                        sm.output.index, sm.output.stats, device=job.settings["device"])
        else:
            merge_stats(list(sm.input.stats), sm.output.stats)
