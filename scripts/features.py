"""Glue for the features rules: see writer_retrieval.features."""
from writer_retrieval import features
from writer_retrieval.jobs import stage_job
from writer_retrieval.storage import merge_stats

if __name__ == "__main__":
    sm = snakemake
    with stage_job(sm, "features") as job:
        if sm.rule == "features_shard":
            features.extract_shard(sm.input.index, sm.input.masks, int(sm.wildcards.shard), sm.params.shard_size,
                                   job.settings, sm.output.descriptors, sm.output.keypoints,
                                   sm.output.index, sm.output.stats)
        else:
            merge_stats(list(sm.input.stats), sm.output.stats)
