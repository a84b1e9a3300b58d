"""Glue for the patches rules: see writer_retrieval.patches."""
from writer_retrieval import patches
from writer_retrieval.jobs import stage_job
from writer_retrieval.storage import merge_stats

if __name__ == "__main__":
    sm = snakemake
    with stage_job(sm, "patches") as job:
        if sm.rule == "patches_shard":
            patches.extract_shard(sm.input.index, sm.input.masks, int(sm.wildcards.shard), sm.params.shard_size,
                                  job.settings, sm.output.patches, sm.output.descriptors,
                                  sm.output.index, sm.output.stats)
        else:
            merge_stats(list(sm.input.stats), sm.output.stats)
