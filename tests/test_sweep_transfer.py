"""Grid axes of the plan: sweeps, per-extractor aggregation, cross-dataset transfer (train_on),
the E-SVM encoding and the rerank graph (writer_retrieval.config / writer_retrieval.plan)."""
import copy

import pytest

from writer_retrieval.config import ConfigError, validate_config
from writer_retrieval.plan import Plan

VIT = {"kind": "vit", "model": {"arch": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 16, "embed_dim": 32,
                                "depth": 2, "num_heads": 2},
       "pretrain": {"method": "attmask", "epochs": 1, "out_dim": 32, "patch_out_dim": 32}}
SYNTHETIC = {"adapter": "synthetic", "writers": 10, "train_writers": 4, "pages_per_writer": 3}


def config(**extra):
    cfg = {"datasets": {"a": dict(SYNTHETIC), "b": {**SYNTHETIC, "seed": 7}},
           "features": {"sift": {"kind": "sift"}, "vit": copy.deepcopy(VIT)},
           "experiments": [{"dataset": "a"}]}
    cfg.update(extra)
    return cfg


def plan_of(cfg) -> Plan:
    return Plan(validate_config(cfg))


def test_a_t_fg_sweep_trains_once_and_embeds_once_per_value():
    cfg = config()
    cfg["features"]["vit"]["sweep"] = {"embed.t_fg": [0, 5, 10]}
    plan = plan_of(cfg)
    names = sorted({e.labels["features"] for e in plan.experiments})
    assert names == ["sift", "vit.t_fg-0", "vit.t_fg-10", "vit.t_fg-5"]
    assert len(plan.variants("pretrain", "a")) == 1
    embeds = plan.variants("embed", "a")
    assert sorted(v.result["t_fg"] for v in embeds) == [0, 5, 10]
    assert {v.inputs["pretrain"] for v in embeds} == {plan.variants("pretrain", "a")[0].folder}
    row = next(e for e in plan.experiments if e.labels["features"] == "vit.t_fg-5")
    assert row.labels["extractor"] == "vit" and row.labels["sweep"] == "embed.t_fg=5"


def test_an_aggregation_sweep_shares_the_extractor_and_its_unswept_stages():
    cfg = config()
    cfg["features"]["sift"]["sweep"] = {"aggregation.codebook_size": [8, 16]}
    plan = plan_of(cfg)
    assert len(plan.variants("features", "a")) == 1
    codebooks = [v for v in plan.variants("codebook", "a") if v.labels["kind"] == "sift"]
    assert sorted(v.result["codebook_size"] for v in codebooks) == [8, 16]
    cfg["features"]["sift"]["sweep"] = {"aggregation.pca": ["none", "whiten", "shrink"]}
    plan = plan_of(cfg)
    assert len([v for v in plan.variants("vlad", "a") if v.labels["kind"] == "sift"]) == 1
    pcas = {e.labels["features"]: e.labels["pca"] for e in plan.experiments if e.labels["kind"] == "sift"}
    assert pcas == {"sift.pca-none": "none", "sift.pca-whiten": "whiten", "sift.pca-shrink": "shrink"}
    assert plan.of_feature("descriptors", "a", "sift.pca-none", "vlad").result == {"pca": "none"}


def test_several_swept_paths_make_every_combination_and_a_pretrain_sweep_trains_each():
    cfg = config()
    cfg["features"]["vit"]["sweep"] = {"pretrain.masking": ["attmask_high", "random", "block"], "embed.t_fg": [0, 5]}
    plan = plan_of(cfg)
    assert len({e.labels["features"] for e in plan.experiments if e.labels["kind"] == "vit"}) == 6
    assert sorted(v.result["masking"] for v in plan.variants("pretrain", "a")) == ["attmask_high", "block", "random"]


def test_an_extractors_aggregation_block_overrides_the_top_level_one():
    cfg = config(aggregation={"codebook_size": 50, "pca_dims": 64})
    cfg["features"]["sift"]["aggregation"] = {"codebook_size": 20}
    filled = validate_config(cfg)
    assert filled["features"]["sift"]["aggregation"]["codebook_size"] == 20
    assert filled["features"]["sift"]["aggregation"]["pca_dims"] == 64
    assert filled["features"]["vit"]["aggregation"]["codebook_size"] == 50


@pytest.mark.parametrize("sweep,expected", [
    ({"embed.tfg": [1]}, "unknown key 'features.vit.tfg-1.embed.tfg' (did you mean 't_fg'?)"),
    ({"embed.t_fg": 5}, "'features.vit.sweep' must map setting paths (for example embed.t_fg) to non-empty lists"),
    ({"kind": ["sift"]}, "'features.vit.sweep' cannot sweep 'kind'"),
    ({"embed.t_fg": ["many"]}, "'features.vit.t_fg-many.embed.t_fg' = 'many' must be of type integer"),
])
def test_sweep_errors_name_the_setting(sweep, expected):
    cfg = config()
    cfg["features"]["vit"]["sweep"] = sweep
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert expected in str(err.value)


def test_a_transfer_row_applies_what_the_train_on_dataset_fit():
    cfg = config(experiments=[{"dataset": "b", "train_on": "a", "encoding": ["none", "esvm"], "rerank": ["none"]}])
    plan = plan_of(cfg)
    # Learned on a: pretraining, codebooks; b's own are never planned.
    assert plan.variants("pretrain", "b") == [] and plan.variants("codebook", "b") == []
    embed_b = plan.of_feature("embed", "b", "vit", train_on="a")
    assert embed_b.sources == {"pretrain": "a"}
    assert plan.input_of(embed_b, "pretrain") is plan.of_feature("pretrain", "a", "vit")
    vlad_b = plan.of_feature("vlad", "b", "sift", train_on="a")
    assert plan.input_of(vlad_b, "codebook") is plan.of_feature("codebook", "a", "sift")
    assert plan.input_of(vlad_b, "features").dataset == "b"
    descriptors_b = plan.of_feature("descriptors", "b", "sift", "vlad", train_on="a")
    assert plan.input_of(descriptors_b, "whitening") is plan.of_feature("descriptors", "a", "sift", "vlad")
    rows = plan.experiments
    assert all(e.dataset == "b" and e.labels["train_on"] == "a" for e in rows)
    esvm = next(v for v in plan.variants("esvm", "b") if v.labels["features"] == "sift")
    assert plan.input_of(esvm, "negatives") is plan.of_feature("descriptors", "a", "sift", "vlad")
    assert {p.dataset for p in plan.path_of(rows[0])} == {"a", "b"}


def test_a_transfer_row_differs_from_the_same_datasets_own_row():
    plan = plan_of(config(experiments=[{"dataset": "b"}, {"dataset": "b", "train_on": "a"}]))
    own = {e.labels["features"] + e.labels["aggregation"]: e for e in plan.experiments if e.labels["train_on"] == "b"}
    moved = {e.labels["features"] + e.labels["aggregation"]: e for e in plan.experiments if e.labels["train_on"] == "a"}
    assert set(own) == set(moved) and all(own[k].folder != moved[k].folder for k in own)
    assert all(".from-a-" in e.folder for e in moved.values())


def test_train_on_must_name_a_dataset():
    with pytest.raises(ConfigError, match="'experiments\\[0\\].train_on' = 'c' is not a key of 'datasets'"):
        validate_config(config(experiments=[{"dataset": "a", "train_on": "c"}]))


def test_fragment_rows_rerank_on_both_graphs_by_default():
    plan = plan_of(config(experiments=[{"dataset": "a", "features": ["sift"], "rerank": ["none", "krnn"],
                                        "exclude_same": "page"}]))
    graphs = sorted((e.labels["rerank"], e.labels["rerank_graph"]) for e in plan.experiments)
    assert graphs == [("krnn", "all"), ("krnn", "other_pages"), ("none", "none")]
    assert sorted(v.result["graph"] for v in plan.variants("rerank")) == ["all", "other_pages"]
    with pytest.raises(ConfigError, match="rerank_graph' other_pages .* needs 'experiments\\[0\\].exclude_same'"):
        validate_config(config(experiments=[{"dataset": "a", "rerank": ["krnn"], "rerank_graph": ["other_pages"]}]))


def test_esvm_rows_read_the_exemplar_svm_descriptors():
    plan = plan_of(config(experiments=[{"dataset": "a", "features": ["sift"], "encoding": ["none", "esvm"],
                                        "rerank": ["none", "sgr"]}]))
    by_name = {e.name: e for e in plan.experiments}
    assert sorted(by_name) == ["sift-vlad-esvm-none", "sift-vlad-esvm-sgr", "sift-vlad-none", "sift-vlad-sgr"]
    esvm = plan.input_of(by_name["sift-vlad-esvm-none"], "descriptors")
    assert esvm.stage == "esvm" and esvm.result == {"C": 1000.0, "class_weight": "balanced"}
    assert plan.input_of(esvm, "descriptors") is plan.input_of(by_name["sift-vlad-none"], "descriptors")
    rerank = plan.input_of(by_name["sift-vlad-esvm-sgr"], "rerank")
    assert plan.input_of(rerank, "descriptors") is esvm
