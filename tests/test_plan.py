"""The workflow plan (writer_retrieval.plan), without Snakemake: variants, hashes, the kind registry."""
import json
from pathlib import Path

import pytest
import yaml

from writer_retrieval.config import load_schema, validate_config
from writer_retrieval.plan import KINDS, Plan, execution_paths

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    return yaml.safe_load((REPO / "configs" / "benchmark-demo.yaml").read_text())  # every extractor kind


def folders(raw: dict) -> dict[tuple[str, str], str]:
    """(stage, user) -> folder: the variant each extractor (or grid row) uses at each stage."""
    plan = Plan(validate_config(raw))
    found = {(stage, user): v.folder for (stage, _, user), v in plan._of_feature.items()}
    for stage in ("binarize", "segment", "rerank", "experiment"):
        found.update({(stage, v.name): v.folder for v in plan.variants(stage)})
    return found


def changed(raw: dict, edit) -> set[tuple[str, str]]:
    """The variants whose folder (hash) changes when `edit` is applied to a copy of the config
    (variants the edit removes from the grid do not count)."""
    before = folders(raw)
    other = json.loads(json.dumps(raw))  # YAML aliases (&demo_embed) become separate blocks
    edit(other)
    after = folders(other)
    assert set(after) <= set(before)
    return {key for key in after if before[key] != after[key]}


def marked_properties(node, name=None):
    if isinstance(node, dict):
        if node.get("x-execution"):
            yield name
        for key, value in node.items():
            children = value.items() if key == "properties" and isinstance(value, dict) else [(name, value)]
            for child_name, child in children:
                yield from marked_properties(child, child_name)
    elif isinstance(node, list):
        for value in node:
            yield from marked_properties(value, name)


def test_schema_marks_exactly_these_settings_as_execution():
    # Every other setting is a result setting; adding an execution mark is a deliberate change here.
    assert sorted(set(marked_properties(load_schema()))) == ["batch_size", "checkpoint_every", "chunk_size",
                                                             "device", "gpus", "num_workers"]


def test_execution_paths_follow_the_extractor_kind(demo):
    paths = execution_paths(validate_config(demo), load_schema())
    assert ("aggregation", "chunk_size") in paths
    assert ("features", "attmask-vit", "embed", "batch_size") in paths
    assert ("features", "attmask-vit", "pretrain", "num_workers") in paths
    assert ("features", "saghog-ft", "finetune", "num_workers") in paths
    assert ("features", "random-vit", "device") in paths and ("preprocess", "sam", "device") in paths
    # SIFT runs on the CPU: only its aggregation block's encoding chunk is marked
    assert {p for p in paths if p[:2] == ("features", "sift")} == {("features", "sift", "aggregation", "chunk_size")}
    assert ("features", "attmask-vit", "pretrain", "epochs") not in paths


@pytest.mark.parametrize("knob", [
    lambda c: [f["embed"].update(batch_size=64) for f in c["features"].values() if "embed" in f],
    lambda c: c["aggregation"].update(chunk_size=1000),
    lambda c: c["features"]["attmask-vit"]["pretrain"].update(num_workers=1),
    lambda c: c["features"]["attmask-vit"]["pretrain"].update(checkpoint_every=3),
    lambda c: c["features"]["random-vit"].update(device="cpu"),
    lambda c: [f.update(device="cuda") for f in c["features"].values() if f["kind"] != "sift"],
    lambda c: c["features"]["saghog-ft"]["finetune"].update(num_workers=2),
    lambda c: c["preprocess"].setdefault("sam", {}).update(device="cpu"),
], ids=["embed.batch_size", "chunk_size", "num_workers", "checkpoint_every", "device", "all devices",
        "finetune.num_workers", "sam.device"])
def test_an_execution_knob_changes_no_folder(demo, knob):
    assert changed(demo, knob) == set()


def test_effective_batch_is_the_pretraining_result_setting(demo):
    def spread(c):  # the same effective batch (32) on two GPUs
        c["features"]["attmask-vit"]["pretrain"].update(batch_size=16)
        c["features"]["attmask-vit"]["gpus"] = 2
    assert changed(demo, spread) == set()
    doubled = changed(demo, lambda c: c["features"]["attmask-vit"].update(gpus=2))
    assert {stage for stage, _ in doubled} == {"pretrain", "embed", "codebook", "vlad", "descriptors", "rerank",
                                               "experiment"}


def stages_by_extractor(keys) -> dict[str, set[str]]:
    found = {}
    for stage, user in keys:
        found.setdefault(stage, set()).add(user)
    return found


def test_a_result_setting_changes_its_stage_and_what_follows_only(demo):
    t_fg = changed(demo, lambda c: c["features"]["random-vit"]["embed"].update(t_fg=20))
    assert stages_by_extractor(t_fg) == {
        "embed": {"random-vit"}, "codebook": {"random-vit"}, "vlad": {"random-vit"},
        "descriptors": {"random-vit:vlad", "random-vit:sum"},
        "experiment": {"random-vit-vlad-none", "random-vit-sum-none"}}
    # One pretraining run serves both AttMask extractors: its epochs re-run both, not the others.
    def more_epochs(c):
        for name in ("attmask-vit", "attmask-vit-l2"):
            c["features"][name]["pretrain"].update(epochs=9)
    epochs = stages_by_extractor(changed(demo, more_epochs))
    assert epochs["pretrain"] == epochs["embed"] == {"attmask-vit", "attmask-vit-l2"}
    assert set(epochs) == {"pretrain", "embed", "codebook", "vlad", "descriptors", "rerank", "experiment"}
    power = stages_by_extractor(changed(demo, lambda c: c["aggregation"].update(power=0.3)))
    assert set(power) == {"vlad", "descriptors", "rerank", "experiment"}  # codebooks and features kept
    assert "saghog:sum" not in power["descriptors"]  # sum pooling never reads the VLAD power


def test_how_pages_are_pooled_later_does_not_re_extract(demo):
    keys = changed(demo, lambda c: c["features"]["random-vit"].update(aggregations=["vlad"]))
    assert keys == set()  # the sum row is gone from the grid, every other folder stays


def test_the_kind_registry_says_which_stages_an_extractor_goes_through(demo):
    plan = Plan(validate_config(demo))
    assert KINDS["sift"].stages == ("features", "codebook", "vlad")
    assert plan.of_feature("features", "demo", "sift") is not None
    assert plan.of_feature("pretrain", "demo", "sift") is None
    assert plan.of_feature("pretrain", "demo", "random-vit") is None  # untrained control row
    assert plan.of_feature("pretrain", "demo", "attmask-vit") is plan.of_feature("pretrain", "demo", "attmask-vit-l2")
    assert plan.of_feature("codebook", "demo", "saghog") is None
    assert plan.of_feature("finetune", "demo", "saghog") is None
    assert plan.of_feature("finetune", "demo", "saghog-ft").inputs["cluster"] == \
        plan.of_feature("cluster", "demo", "saghog").folder


def test_an_experiment_path_lists_every_upstream_stage_once(demo):
    plan = Plan(validate_config(demo))
    (exp,) = [e for e in plan.experiments if e.labels["features"] == "saghog-ft" and e.labels["rerank"] == "sgr"]
    assert [v.stage for v in plan.path_of(exp)] == ["binarize", "patches", "pretrain", "cluster", "finetune",
                                                    "embed_patches", "descriptors", "rerank", "experiment"]
    assert plan.path_of(exp)[-1] is exp


def test_variants_are_immutable(demo):
    plan = Plan(validate_config(demo))
    variant = plan.experiments[0]
    with pytest.raises(AttributeError):
        variant.name = "other"
    with pytest.raises(TypeError):
        variant.result["top_k"] = 3


def test_a_job_finds_its_variant_by_stage_and_wildcards(demo):
    plan = Plan(validate_config(demo))
    embed = plan.of_feature("embed", "demo", "attmask-vit")
    assert plan.job_variant("embed", {"dataset": "demo", "folder": embed.folder}) is embed
    assert dict(embed.execution) == {"batch_size": 32, "device": "auto"}
    assert "batch_size" not in embed.result and embed.result["t_fg"] == 10
    with pytest.raises(KeyError, match="no embed variant 'nope-0000000000' of dataset 'demo'"):
        plan.variant("embed", "demo", "nope-0000000000")
