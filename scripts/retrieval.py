"""Glue for rule `retrieval`: see writer_retrieval.retrieval.run_experiment."""
import json

import faiss

from writer_retrieval.logs import stage_logging
from writer_retrieval.retrieval import run_experiment

if __name__ == "__main__":
    sm = snakemake
    faiss.omp_set_num_threads(sm.threads)
    with stage_logging(sm.log[0], sm.rule):
        exp = dict(sm.params.experiment)
        pca = json.loads(open(sm.input.pca).read())
        labels = {k: exp[k] for k in ("dataset", "features", "aggregation", "rerank", "settings_hash")}
        labels["pca_fit_on"] = pca["pca_fit_on"]
        labels["code_version"] = sm.params.code_version
        run_experiment(sm.input.descriptors, sm.input.index, labels, dict(exp["settings"]), sm.output.rankings,
                       sm.output.metrics, reranked_path=sm.input.reranked[0] if sm.input.reranked else None)
