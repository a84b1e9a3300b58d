"""Glue for rule `retrieval`: see writer_retrieval.retrieval.run_experiment."""
import faiss

from writer_retrieval.jobs import stage_job
from writer_retrieval.plan import STAGE_DIRS
from writer_retrieval.provenance import path_columns
from writer_retrieval.retrieval import run_experiment

if __name__ == "__main__":
    sm = snakemake
    faiss.omp_set_num_threads(sm.threads)
    with stage_job(sm, "experiment") as job:
        labels = {**sm.params.labels, "code_version": sm.params.code_version,
                  **path_columns(sm.input.path_settings, [s for s in STAGE_DIRS if s != "experiment"])}
        run_experiment(sm.input.descriptors, sm.input.index, labels, job.settings, sm.output.rankings,
                       sm.output.metrics, sm.output.queries, reranked_path=sm.input.reranked[0] if sm.input.reranked else None)
