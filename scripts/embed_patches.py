"""Glue for the SAGHOG embedding rules: see writer_retrieval.embed_patches.embed_patches_shard, with
the patch encoder of writer_retrieval.finetune.patch_encoder."""
import torch

from writer_retrieval.embed_patches import embed_patches_shard
from writer_retrieval.storage import merge_stats
from writer_retrieval.finetune import patch_encoder
from writer_retrieval.jobs import stage_job

if __name__ == "__main__":
    sm = snakemake
    torch.set_num_threads(sm.threads)
    with stage_job(sm, "embed_patches") as job:
        s = job.settings
        if sm.rule == "embed_patches_shard":
            encode = patch_encoder(sm.input.backbone[0], s["model"], sm.input.finetuned[0] if sm.input.finetuned else None,
                                   device=s["device"], batch_size=s["batch_size"])
            embed_patches_shard(sm.input.patches, sm.input.shard_index, encode, s["batch_size"], s["power"],
                                sm.output.vectors, sm.output.doc_ids, sm.output.stats, sm.input.index,
                                int(sm.wildcards.shard), sm.params.shard_size)
        else:
            merge_stats(list(sm.input.stats), sm.output.stats)
