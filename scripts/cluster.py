"""Glue for rule `cluster`: see writer_retrieval.cluster.pseudo_labels."""
import faiss

from writer_retrieval import cluster
from writer_retrieval.jobs import stage_job

if __name__ == "__main__":
    sm = snakemake
    faiss.omp_set_num_threads(sm.threads)
    with stage_job(sm, "cluster") as job:
        cluster.pseudo_labels(list(sm.input.descriptors), list(sm.input.shard_index), list(sm.input.patches),
                              sm.input.index, job.settings, sm.output.labels, sm.output.stats,
                              sm.output.summary, sm.output.contact_sheet)
