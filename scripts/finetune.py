"""Glue for rule `finetune`: see writer_retrieval.finetune.finetune."""
import torch

from writer_retrieval.finetune import finetune
from writer_retrieval.jobs import resumable_run, stage_job

if __name__ == "__main__":
    sm = snakemake
    torch.set_num_threads(sm.threads)
    with stage_job(sm, "finetune") as job:
        settings = job.settings
        outputs = [sm.output.model, sm.output.log, sm.output.checkpoint]
        with resumable_run(sm.params.out_dir, outputs) as scratch:
            finetune([list(p) for p in zip(sm.input.patches, sm.input.shard_index)], sm.input.labels, sm.input.index,
                     sm.input.backbone[0], settings["model"], settings, scratch,
                     device=settings["device"])
