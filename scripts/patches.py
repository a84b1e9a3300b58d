"""Glue for the patches rules: see writer_retrieval.patches."""
from writer_retrieval import features, patches
from writer_retrieval.logs import stage_logging

if __name__ == "__main__":
    sm = snakemake
    with stage_logging(sm.log[0], sm.rule):
        if sm.rule == "patches_shard":
            patches.extract_shard(sm.input.index, sm.input.masks, int(sm.wildcards.shard), sm.params.shard_size,
                                  dict(sm.params.settings), sm.output.patches, sm.output.descriptors,
                                  sm.output.index, sm.output.stats)
        else:
            features.merge_stats(list(sm.input), sm.output.stats)
