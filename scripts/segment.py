"""Glue for the segment rules: see writer_retrieval.segment."""
import pandas as pd

from writer_retrieval.binarize import shard_rows
from writer_retrieval.logs import stage_logging
from writer_retrieval.storage import write_parquet

if __name__ == "__main__":
    sm = snakemake
    with stage_logging(sm.log[0], sm.rule):
        if sm.rule == "segment_shard":
            import torch

            from writer_retrieval.segment import segment_pages

            torch.set_num_threads(sm.threads)
            settings = dict(sm.params.settings)
            rows = shard_rows(pd.read_parquet(sm.input.index), int(sm.wildcards.shard), sm.params.shard_size)
            table = segment_pages(rows.itertuples(index=False), settings, sm.params.out_dir,
                                  device=settings["device"],
                                  random_weights_for_testing=settings["random_weights_for_testing"])
            write_parquet(table, sm.output[0])
        else:
            write_parquet(pd.concat([pd.read_parquet(p) for p in sm.input], ignore_index=True), sm.output[0])
