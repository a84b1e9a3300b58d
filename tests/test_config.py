from pathlib import Path

import pytest
import yaml

from writer_retrieval.config import ConfigError, check_dataset_roots, load_schema, validate_config
from writer_retrieval.plan import Plan


def base(**over):
    cfg = {"datasets": {"demo": {"adapter": "synthetic"}}, "experiments": [{"dataset": "demo"}]}
    cfg.update(over)
    return cfg


def test_defaults_are_filled_from_the_schema():
    cfg = validate_config(base())
    pre = cfg["preprocess"]
    assert {k: pre[k] for k in ("method", "window", "k", "compare")} == {"method": "sauvola", "window": 51, "k": 0.2,
                                                                         "compare": []}
    assert pre["sam"]["model_type"] == "vit_t" and pre["sam"]["checkpoint"] is None
    assert pre["sam"]["random_weights_for_testing"] is False  # the testing switch is never the default
    assert cfg["on_bad_input"] == "stop" and cfg["shard_size"] == 64
    demo = cfg["datasets"]["demo"]
    assert (demo["writers"], demo["train_writers"], demo["pages_per_writer"], demo["seed"]) == (40, 16, 4, 0)
    assert demo["empty_page_ink"] == 0.0005  # default reached through a $ref


@pytest.mark.parametrize("cfg,expected", [
    (base(preprocess={"windw": 41}),
     "unknown key 'preprocess.windw' (did you mean 'window'?). Allowed keys in 'preprocess': compare, k, method, sam, window"),
    (base(bogus=1), "unknown key 'bogus'. Allowed keys in the top level: aggregation, datasets, esvm, experiments, features,"),
    (base(preprocess={"method": "niblack"}),
     "'preprocess.method' = 'niblack' is not allowed; allowed: otsu, sauvola, sam, sam+otsu, sam+sauvola"),
    (base(preprocess={"method": "sam+sauvola"}), "preprocess.sam.checkpoint"),
    (base(preprocess={"method": "sam", "sam": {"checkpoint": "/nonexistent/mobile_sam.pt"}}), "/nonexistent/mobile_sam.pt"),
    (base(preprocess={"sam": {"image_size": 256}}), "'preprocess.sam.image_size' is for testing with random weights only"),
    (base(on_bad_input="ignore"), "'on_bad_input' = 'ignore' is not allowed; allowed: stop, skip"),
    (base(shard_size=0), "'shard_size' = 0 must be >= 1"),
    (base(shard_size="big"), "'shard_size' = 'big' must be of type integer"),
    (base(datasets={"x": {"adapter": "icdar2017"}}, experiments=[{"dataset": "x"}]),
     "'datasets.x.root' is required: the folder where the x files are. Set it in the config file (root: /data/x) "
     "or on the command line: --config 'datasets={x: {root: /data/x}}'"),
    (base(datasets={"x": {"adapter": "iam"}}, experiments=[{"dataset": "x"}]),
     "'datasets.x.adapter' = 'iam' is not allowed; allowed: synthetic, icdar2017, icdar2019, cvl, hisfrag20, folder, words"),
    (base(datasets={"x": {"adapter": "folder", "root": "/d"}}, experiments=[{"dataset": "x"}]),
     "'datasets.x' needs exactly one of: 'labels', 'pattern'"),
    (base(datasets={"x": {"adapter": "cvl", "root": "/d", "labels": "l.csv"}}, experiments=[{"dataset": "x"}]),
     "unknown key 'datasets.x.labels'"),
    (base(experiments=[{"dataset": "nope"}]), "'experiments[0].dataset' = 'nope' is not a key of 'datasets'; allowed: demo"),
    (base(preprocess={"window": 50}), "'preprocess.window' = 50 must be odd"),
    (base(datasets={"demo": {"adapter": "synthetic", "writers": 4, "train_writers": 4}}),
     "'datasets.demo.train_writers' = 4 must be smaller than 'datasets.demo.writers' = 4"),
])
def test_errors_name_the_key_and_what_is_allowed(cfg, expected):
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert expected in str(err.value)


def test_binarize_variant_names_hash_only_relevant_settings():
    a = validate_config(base(preprocess={"method": "sauvola", "compare": ["otsu"]}))
    b = validate_config(base(preprocess={"method": "sauvola", "window": 31, "compare": ["otsu"]}))
    va, vb = ([v.folder for v in Plan(c).variants("binarize", "demo")] for c in (a, b))
    assert [n.split("-")[0] for n in va] == ["sauvola", "otsu"]
    otsu_a = [n for n in va if n.startswith("otsu")]
    assert otsu_a == [n for n in vb if n.startswith("otsu")]  # window does not touch Otsu
    assert [n for n in va if n.startswith("sauvola")] != [n for n in vb if n.startswith("sauvola")]
    c = validate_config(base(datasets={"demo": {"adapter": "synthetic", "seed": 5}}))
    assert {v.folder for v in Plan(c).variants("binarize", "demo")}.isdisjoint(va)  # another dataset, other folders


PRESETS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")) + [Path(__file__).parents[1] / "config.yaml"]


def test_user_presets_validate_once_their_roots_are_supplied_and_point_at_nothing_of_ours():
    schema = load_schema()
    for path in PRESETS:
        text = path.read_text()
        assert "shared/" not in text, f"{path.name} points at the project's own data"
        raw = yaml.safe_load(text)
        for dataset in raw["datasets"].values():
            assert "root" not in dataset, f"{path.name}: a dataset root is the user's value"
            if dataset["adapter"] != "synthetic":
                dataset["root"] = "/data/root"
        validate_config(raw, schema)


def test_a_missing_dataset_folder_names_the_key_and_an_example(tmp_path):
    cfg = validate_config(base(datasets={"demo": {"adapter": "synthetic"},
                                         "x": {"adapter": "icdar2017", "root": str(tmp_path / "nope")}},
                               experiments=[{"dataset": "x"}]))
    with pytest.raises(ConfigError) as err:
        check_dataset_roots(cfg, ["x"])
    assert f"'datasets.x.root' = '{tmp_path / 'nope'}': no such folder" in str(err.value)
    assert "--config 'datasets={x: {root: /data/x}}'" in str(err.value)
    check_dataset_roots(cfg, ["demo"])  # generated: no root to check
    (tmp_path / "nope").mkdir()
    check_dataset_roots(cfg, ["x"])
