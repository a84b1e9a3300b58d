"""Glue for the features rules: see writer_retrieval.features."""
from writer_retrieval import features
from writer_retrieval.logs import stage_logging

if __name__ == "__main__":
    sm = snakemake
    with stage_logging(sm.log[0], sm.rule):
        if sm.rule == "features_shard":
            features.extract_shard(sm.input.index, sm.input.masks, int(sm.wildcards.shard), sm.params.shard_size,
                                   dict(sm.params.settings), sm.output.descriptors, sm.output.keypoints,
                                   sm.output.index, sm.output.stats)
        else:
            features.merge_stats(list(sm.input), sm.output.stats)
