"""Glue for the VLAD rules: see writer_retrieval.vlad."""
import faiss

from writer_retrieval import vlad
from writer_retrieval.features import load_descriptors
from writer_retrieval.jobs import stage_job

# Local descriptors per page, by feature kind: RootSIFT, or ViT foreground patch tokens.
LOADERS = {"sift": load_descriptors, "vit": vlad.load_tokens}

if __name__ == "__main__":
    sm = snakemake
    faiss.omp_set_num_threads(sm.threads)
    with stage_job(sm, "codebook" if sm.rule == "vlad_codebook" else "vlad") as job:
        if sm.rule == "vlad_codebook":
            load = LOADERS[sm.params.kind]
            shards = list(zip(sm.input.descriptors, sm.input.shard_index))
            vlad.build_codebook(shards, sm.input.index, job.settings, lambda h: load(*h), sm.output.codebook,
                                sm.output.info)
        elif sm.rule == "vlad_shard":
            load = LOADERS[sm.params.kind]
            vlad.encode_shard(load(sm.input.descriptors, sm.input.shard_index), sm.input.codebook, job.settings,
                              sm.output.vectors, sm.output.doc_ids)
