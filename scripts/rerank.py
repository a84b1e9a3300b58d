"""Glue for rule `rerank`: see writer_retrieval.rerank.rerank_test_split."""
import faiss

from writer_retrieval.jobs import stage_job
from writer_retrieval.rerank import rerank_test_split

if __name__ == "__main__":
    sm = snakemake
    faiss.omp_set_num_threads(sm.threads)
    with stage_job(sm, "rerank") as job:
        rerank_test_split(sm.input.descriptors, job.settings, sm.output.reranked,
                          index_path=sm.input.index[0] if sm.input.index else None)
