"""Glue for rule `descriptors`: see writer_retrieval.pca.whiten."""
import numpy as np
import pandas as pd

from writer_retrieval.jobs import stage_job
from writer_retrieval.pca import sum_pooled_cls, whiten

if __name__ == "__main__":
    sm = snakemake
    with stage_job(sm, "descriptors") as job:
        if sm.params.one_row_per_page:
            vectors = np.concatenate([np.load(p) for p in sm.input.vectors])
            doc_ids = pd.concat([pd.read_parquet(p) for p in sm.input.doc_ids]).doc_id.tolist()
        else:
            pooled = {}
            for cls_path, index_path in zip(sm.input.vectors, sm.input.doc_ids):
                pooled.update(sum_pooled_cls(cls_path, index_path))
            doc_ids = list(pooled)
            vectors = np.stack([pooled[d] for d in doc_ids])
        whiten(doc_ids, vectors, sm.input.index, job.settings, sm.output.descriptors, sm.output.info,
               model_path=sm.output.whitening, fitted_path=sm.input.fitted[0] if sm.input.fitted else None)
