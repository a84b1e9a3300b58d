"""Glue for the VLAD rules: see writer_retrieval.vlad."""
import faiss

from writer_retrieval import vlad
from writer_retrieval.features import load_descriptors
from writer_retrieval.logs import stage_logging

# Local descriptors per page, by feature kind: RootSIFT, or ViT foreground patch tokens.
LOADERS = {"sift": load_descriptors, "vit": vlad.load_tokens}

if __name__ == "__main__":
    sm = snakemake
    faiss.omp_set_num_threads(sm.threads)
    load = LOADERS[sm.params.kind]
    with stage_logging(sm.log[0], sm.rule):
        settings = dict(sm.params.settings)
        if sm.rule == "vlad_codebook":
            shards = list(zip(sm.input.descriptors, sm.input.shard_index))
            vlad.build_codebook(shards, sm.input.index, settings, lambda h: load(*h), sm.output.codebook,
                                sm.output.info)
        else:
            vlad.encode_shard(load(sm.input.descriptors, sm.input.shard_index), sm.input.codebook, settings,
                              sm.output.vectors, sm.output.doc_ids)
