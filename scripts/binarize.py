"""Glue for the binarize rules: see writer_retrieval.binarize."""
from writer_retrieval import binarize
from writer_retrieval.logs import stage_logging

if __name__ == "__main__":
    sm = snakemake
    with stage_logging(sm.log[0], sm.rule):
        if sm.rule == "binarize_shard":
            binarize.binarize_shard(sm.input.index, int(sm.wildcards.shard), sm.params.shard_size,
                                    dict(sm.params.settings), sm.params.masks_dir, sm.output[0],
                                    regions_dir=sm.params.regions_dir)
        elif sm.rule == "binarize":
            binarize.merge_shards(list(sm.input), sm.output.stats, sm.output.quality, sm.output.settings,
                                  dict(sm.params.settings))
        else:
            binarize.summarize_quality(list(sm.input), sm.params.variants, sm.output[0])
