"""Glue for rule `rerank`: see writer_retrieval.rerank.rerank_test_split."""
import faiss

from writer_retrieval.logs import stage_logging
from writer_retrieval.rerank import rerank_test_split

if __name__ == "__main__":
    sm = snakemake
    faiss.omp_set_num_threads(sm.threads)
    with stage_logging(sm.log[0], sm.rule):
        rerank_test_split(sm.input.descriptors, dict(sm.params.settings), sm.output[0])
