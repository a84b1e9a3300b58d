"""Glue for the segment rules: see writer_retrieval.segment."""
import pandas as pd

from writer_retrieval.binarize import shard_rows
from writer_retrieval.jobs import stage_job
from writer_retrieval.storage import write_parquet

if __name__ == "__main__":
    sm = snakemake
    with stage_job(sm, "segment") as job:
        if sm.rule == "segment_shard":
            import torch

            from writer_retrieval.segment import segment_pages

            torch.set_num_threads(sm.threads)
            rows = shard_rows(pd.read_parquet(sm.input.index), int(sm.wildcards.shard), sm.params.shard_size)
            table = segment_pages(rows.itertuples(index=False), job.settings, sm.output.pages, sm.output.regions,
                                  device=job.settings["device"],
                                  random_weights_for_testing=job.settings["random_weights_for_testing"])
            write_parquet(table, sm.output.table)
        else:
            write_parquet(pd.concat([pd.read_parquet(p) for p in sm.input.tables], ignore_index=True),
                          sm.output.table)
