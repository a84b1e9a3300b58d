"""Glue for rule `cluster`: see writer_retrieval.cluster.pseudo_labels."""
import faiss

from writer_retrieval import cluster
from writer_retrieval.logs import stage_logging

if __name__ == "__main__":
    sm = snakemake
    faiss.omp_set_num_threads(sm.threads)
    with stage_logging(sm.log[0], sm.rule):
        cluster.pseudo_labels(list(sm.input.descriptors), list(sm.input.shard_index), list(sm.input.patches),
                              sm.input.index, dict(sm.params.settings), sm.output.labels, sm.output.stats,
                              sm.output.summary, sm.output.contact_sheet)
