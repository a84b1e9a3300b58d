"""Glue for rule `descriptors`: see writer_retrieval.pca.whiten."""
import numpy as np
import pandas as pd

from writer_retrieval.logs import stage_logging
from writer_retrieval.pca import whiten

if __name__ == "__main__":
    sm = snakemake
    with stage_logging(sm.log[0], sm.rule):
        vectors = np.concatenate([np.load(p) for p in sm.input.vectors])
        doc_ids = pd.concat([pd.read_parquet(p) for p in sm.input.doc_ids]).doc_id.tolist()
        whiten(doc_ids, vectors, sm.input.index, dict(sm.params.settings), sm.output.descriptors, sm.output.info)
