"""One stage job as a script sees it: its variant from the plan, logging, timing and provenance.

    with stage_job(snakemake, "embed") as job:
        embed_shard(..., job.settings, ...)

`job.settings` holds the variant's result settings (hashed) and its execution settings (devices,
batch sizes, workers), which come from the plan built from the job's config, not from Snakemake
params, so changing one re-runs nothing. On exit the job writes its provenance: `output.run` (a shard job's run facts) or
`output.settings` (settings.json of a single-job stage: both kinds of settings, inputs, run facts).

With WR_RECORD_SETTINGS=<folder> set, the settings are handed out as mappings that record which
keys the stage's code reads, written to <folder>/<rule>-<folder>-<shard>.json on exit; a test
compares them with the hashed keys (a hashed key no code reads re-runs work for nothing, a read
outside the mapping cannot happen).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .logs import stage_logging
from .plan import Plan, Variant, plain
from .provenance import merge_runs, read_runs, run_facts
from .storage import write_json

RECORD_ENV = "WR_RECORD_SETTINGS"


class RecordingDict(dict):
    """A dict that notes the dotted path of every key read through it (nested dicts too)."""

    def __init__(self, data: dict, note, prefix: tuple = ()):
        super().__init__({k: RecordingDict(v, note, (*prefix, k)) if isinstance(v, dict) else v
                          for k, v in data.items()})
        self._note_path, self._prefix = note, prefix

    def _note(self, key):
        self._note_path(".".join(map(str, (*self._prefix, key))))

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self._note(key)
        return super().get(key, default)

    def items(self):  # a copy through items() hands every key on
        for key in self.keys():
            self._note(key)
        return super().items()

    def __iter__(self):  # overridden so that {**d} and dict(d) copy through __getitem__ (noted)
        return super().__iter__()

    def __reduce__(self):  # checkpoints pickle settings: store a plain dict
        return dict, (plain(self),)


def merged(result: dict, execution: dict) -> dict:
    """Result and execution settings in one mapping (a stage function that takes one settings dict)."""
    out = dict(result)
    for key, value in execution.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class StageJob:
    variant: Variant
    settings: dict          # result and execution settings in one mapping
    log: object
    reads: tuple[set, set] | None = None   # (result keys, execution keys) read, when recording


def _leaf_paths(settings, prefix=()) -> list[str]:
    if isinstance(settings, dict) and settings:
        return [p for k, v in settings.items() for p in _leaf_paths(v, (*prefix, k))]
    return [".".join(map(str, prefix))] if prefix else []


def _write_record(job: StageJob, sm) -> None:
    folder = Path(os.environ[RECORD_ENV])
    name = "-".join([sm.rule, job.variant.folder, *([sm.wildcards["shard"]] if "shard" in sm.wildcards.keys() else [])])
    record = {"stage": job.variant.stage, "rule": sm.rule, "folder": job.variant.folder,
              "hashed": _leaf_paths(plain(job.variant.result)), "execution": _leaf_paths(plain(job.variant.execution)),
              "read_result": sorted(job.reads[0]), "read_execution": sorted(job.reads[1])}
    write_json(record, folder / f"{name}.json")


@contextlib.contextmanager
def stage_job(sm, stage: str):
    """Run one job of `stage` (a shard job, a single job, or the merge of a stage's shard jobs)."""
    variant = Plan(sm.config).job_variant(stage, sm.wildcards)
    settings = merged(plain(variant.result), plain(variant.execution))
    reads = None
    if os.environ.get(RECORD_ENV):
        reads = (set(), set())
        execution_keys = set(_leaf_paths(plain(variant.execution)))
        settings = RecordingDict(settings, lambda path: reads[path in execution_keys].add(path))
    start = time.perf_counter()
    with stage_logging(sm.log[0], sm.rule) as log:
        job = StageJob(variant, settings, log, reads)
        yield job
        if "runs" in sm.input.keys():  # a merge: the stage's time is that of its shard jobs
            facts = merge_runs(read_runs(sm.input.runs))
        else:
            facts = run_facts(plain(variant.execution).get("device"), sm.threads, time.perf_counter() - start)
        if "run" in sm.output.keys():
            write_json(facts, sm.output.run)
        else:
            write_json(variant.record(**facts), sm.output.settings)
        if reads is not None:
            _write_record(job, sm)


@contextlib.contextmanager
def resumable_run(out_dir, outputs):
    """Train in out_dir/resume/ and move the files named like `outputs` onto them when training ends.

    The scratch folder is not a rule output, so Snakemake keeps it when a job fails or is killed,
    and the next attempt resumes from its checkpoint; a finished run leaves only declared outputs."""
    scratch = Path(out_dir) / "resume"
    scratch.mkdir(parents=True, exist_ok=True)
    yield scratch
    for path in outputs:
        os.replace(scratch / Path(path).name, path)
    scratch.rmdir()
