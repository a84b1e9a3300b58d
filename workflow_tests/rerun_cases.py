"""What a dry run plans on a finished tiny run after one config change: execution knobs plan nothing,
a result setting plans its stage and what follows. Used by test_workflow.py and by
bench/rerun_table.py (the table in docs/reruns.md)."""
from dataclasses import dataclass
from typing import Callable

# Scoring and reporting follow every result change.
TAIL = {"report": 1, "all": 1}


@dataclass(frozen=True)
class Case:
    config: str                   # workflow_tests/configs/<config>.yaml, finished before the change
    change: str                   # what the docs/reruns.md table says
    edit: Callable[[dict], None]
    jobs: dict                    # the job count per rule the dry run must plan

    @property
    def kind(self) -> str:
        return "execution" if not self.jobs else "result"


def _all_extractors(key, **values):
    def edit(cfg):
        for feat in cfg["features"].values():
            block = feat.setdefault(key, {}) if key else feat
            block.update(values)
    return edit


def _extractor(name, key, **values):
    def edit(cfg):
        block = cfg["features"][name].setdefault(key, {}) if key else cfg["features"][name]
        block.update(values)
    return edit


def _pretrain(**values):
    def edit(cfg):
        for feat in cfg["features"].values():
            if feat.get("pretrain", {}).get("method", "none") != "none" or feat["kind"] == "saghog":
                feat.setdefault("pretrain", {}).update(values)
    return edit


def _spread_over_two_gpus(cfg):
    """The same effective batch (8) as 4 per process on 2 GPUs."""
    for feat in cfg["features"].values():
        if feat.get("pretrain", {}).get("method") == "attmask":
            feat["pretrain"]["batch_size"] = 4
            feat["gpus"] = 2


CASES = [
    # Execution knobs: how a stage runs, not what it computes.
    Case("tiny", "aggregation.chunk_size: 65536 -> 1000", lambda c: c["aggregation"].update(chunk_size=1000), {}),
    Case("tiny-vit", "embed.batch_size: 16 -> 4 (every ViT)", _all_extractors("embed", batch_size=4), {}),
    Case("tiny-vit", "device: cpu -> auto (every ViT; auto is the CPU here)", _all_extractors(None, device="auto"),
         {}),
    Case("tiny-vit", "AttMask pretrain.num_workers: 0 -> 1", _pretrain(num_workers=1), {}),
    Case("tiny-vit", "AttMask pretrain.checkpoint_every: 1 -> 2", _pretrain(checkpoint_every=2), {}),
    Case("tiny-vit", "AttMask batch_size 8 x 1 GPU -> 4 x 2 GPUs (same effective batch)", _spread_over_two_gpus, {}),
    Case("tiny-ssl", "SAGHOG embed.batch_size: 512 -> 64", _extractor("saghog", "embed", batch_size=64), {}),
    Case("tiny-ssl", "SAGHOG finetune.num_workers: 0 -> 1", _extractor("saghog-ft", "finetune", num_workers=1), {}),
    # Result settings: their stage and what follows, nothing upstream.
    Case("tiny", "aggregation.codebook_size: 32 -> 24", lambda c: c["aggregation"].update(codebook_size=24),
         {"vlad_codebook": 1, "vlad_shard": 4, "vlad": 1, "descriptors": 1, "rerank": 3, "retrieval": 4, **TAIL}),
    Case("tiny", "aggregation.power: 0.5 -> 0.3", lambda c: c["aggregation"].update(power=0.3),
         {"vlad_shard": 4, "vlad": 1, "descriptors": 1, "rerank": 3, "retrieval": 4, **TAIL}),
    Case("tiny", "aggregation.pca_dims: 384 -> 8", lambda c: c["aggregation"].update(pca_dims=8),
         {"descriptors": 1, "rerank": 3, "retrieval": 4, **TAIL}),
    Case("tiny-vit", "random-vit embed.t_fg: 10 -> 20", _extractor("random-vit", "embed", t_fg=20),
         {"embed_shard": 1, "embed": 1, "vlad_codebook": 1, "vlad_shard": 1, "vlad": 1, "descriptors": 2,
          "retrieval": 2, **TAIL}),
    Case("tiny-vit", "AttMask pretrain.epochs: 2 -> 3 (one run, two extractors)", _pretrain(epochs=3),
         {"pretrain": 1, "embed_shard": 2, "embed": 2, "vlad_codebook": 2, "vlad_shard": 2, "vlad": 2,
          "descriptors": 3, "retrieval": 3, **TAIL}),
    Case("tiny-ssl", "SAGHOG embed.power: 0.4 -> 0.5", _extractor("saghog", "embed", power=0.5),
         {"embed_patches_shard": 1, "embed_patches": 1, "descriptors": 1, "retrieval": 1, **TAIL}),
]


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    counts, inside = {}, False
    for line in output.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            inside = True
        elif inside and len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
        elif inside and parts and parts[0] == "total":
            break
    return counts
