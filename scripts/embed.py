"""Glue for the embedding rules: ViT windows (writer_retrieval.embed.embed_shard) or SAGHOG patches
(writer_retrieval.embed.embed_patches_shard with writer_retrieval.finetune.patch_encoder)."""
import torch

from writer_retrieval.embed import embed_patches_shard, embed_shard
from writer_retrieval.finetune import patch_encoder
from writer_retrieval.logs import stage_logging

if __name__ == "__main__":
    sm = snakemake
    torch.set_num_threads(sm.threads)
    with stage_logging(sm.log[0], sm.rule):
        if sm.rule == "embed_patches_shard":
            embed = sm.params.embed
            encode = patch_encoder(sm.input.backbone, dict(sm.params.model),
                                   sm.input.finetuned[0] if sm.input.finetuned else None,
                                   dict(sm.params.finetune), device=sm.params.device, batch_size=embed["batch_size"])
            embed_patches_shard(sm.input.patches, sm.input.shard_index, encode, embed["batch_size"], embed["power"],
                                sm.output.vectors, sm.output.doc_ids, sm.output.stats, sm.input.index,
                                int(sm.wildcards.shard), sm.params.shard_size)
        else:
            embed_shard(sm.input.index, sm.input.masks, int(sm.wildcards.shard), sm.params.shard_size,
                        dict(sm.params.settings), sm.input.backbone[0] if sm.input.backbone else None,
                        sm.output.tokens, sm.output.cls, sm.output.index, sm.output.stats, device=sm.params.device)
