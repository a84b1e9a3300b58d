"""Glue for rule `dataset`: see writer_retrieval.dataset.build_index."""
from writer_retrieval.dataset import build_index
from writer_retrieval.logs import stage_logging

# The guard keeps spawned worker processes (which re-import this file) from re-running the stage.
if __name__ == "__main__":
    with stage_logging(snakemake.log[0], "dataset"):
        build_index(snakemake.wildcards.dataset, dict(snakemake.params.settings), snakemake.output.index,
                    snakemake.output.rejected, snakemake.output.generated,
                    on_bad_input=snakemake.params.on_bad_input, workers=snakemake.threads)
