"""Glue for the binarize rules: see writer_retrieval.binarize."""
from pathlib import Path

from writer_retrieval import binarize
from writer_retrieval.jobs import stage_job
from writer_retrieval.logs import stage_logging

if __name__ == "__main__":
    sm = snakemake
    if sm.rule == "binarize_quality_summary":
        with stage_logging(sm.log[0], sm.rule):
            binarize.summarize_quality(list(sm.input), sm.params.variants, sm.output[0])
    else:
        with stage_job(sm, "binarize") as job:
            if sm.rule == "binarize_shard":
                Path(sm.output.masks).mkdir(parents=True, exist_ok=True)
                binarize.binarize_shard(sm.input.index, int(sm.wildcards.shard), sm.params.shard_size, job.settings,
                                        sm.output.masks, sm.output.table,
                                        regions_dir=sm.input.regions[0] if sm.input.regions else None)
            else:
                binarize.merge_shards(list(sm.input.tables), sm.output.stats, sm.output.quality)
