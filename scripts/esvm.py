"""Glue for the E-SVM rules: see writer_retrieval.esvm."""
from writer_retrieval import esvm
from writer_retrieval.jobs import stage_job

if __name__ == "__main__":
    sm = snakemake
    with stage_job(sm, "esvm") as job:
        if sm.rule == "esvm_shard":
            esvm.encode_shard(sm.input.descriptors, sm.input.negatives, job.settings, int(sm.wildcards.shard),
                              sm.params.shard_size, sm.output.vectors, sm.output.doc_ids)
        else:
            esvm.gather(sm.input.vectors, sm.input.doc_ids, sm.input.descriptors, sm.input.index,
                        sm.output.descriptors, sm.output.info)
