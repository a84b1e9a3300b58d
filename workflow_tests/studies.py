"""The shipped study configs (t_fg sweep, masking ablation, synthetic -> AHAWP transfer) shrunk to
the tiny data and merged into one workflow run, plus E-SVM and fragment-style reranking rows."""
import copy
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
AHAWP = REPO.parent / "shared" / "data" / "ahawp-words"
STUDIES = {"tfg": "sweep-tfg", "mask": "masking-ablation", "xfer": "transfer-synthetic-ahawp"}

TINY = {"adapter": "synthetic", "writers": 10, "train_writers": 4, "pages_per_writer": 3, "page_width": 480,
        "page_height": 600, "difficulty": 0.4, "seed": 1}
TINY_VIT = {"arch": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2,
            "num_heads": 2}
TINY_ATTMASK = {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "global_size": 64, "local_size": 32,
                "n_local_crops": 2, "window": 96, "max_windows": 16, "head_hidden_dim": 64, "out_dim": 32,
                "patch_out_dim": 32}
TINY_SAGHOG = {"patches": {"max_per_page": 100}, "cluster": {"clusters": 20, "iterations": 10},
               "model": {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_dim": 16, "decoder_heads": 2},
               "pretrain": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0, "max_patches": 256}}


def ahawp_subset(folder: Path, writers: int = 6, words: int = 24) -> Path:
    """A copy of the first `words` word images of `writers` AHAWP writers (2 pseudo-pages each),
    with its labels.csv: the adapter indexes every image under its root."""
    import shutil

    labels = pd.read_csv(AHAWP / "labels.csv", dtype=str)
    chosen = sorted(labels.writer.unique())[:writers]
    subset = labels[labels.writer.isin(chosen)].groupby("writer").head(words)
    root = folder / "ahawp"
    for path in subset.path:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(AHAWP / path, root / path)
    subset.to_csv(root / "labels.csv", index=False)
    return root


def shrink(entry: dict) -> dict:
    """An extractor of a shipped config at tiny sizes (its method, masking and sweep kept)."""
    entry = copy.deepcopy(entry)
    if entry["kind"] == "vit":
        entry["model"] = dict(TINY_VIT)
        if entry["pretrain"]["method"] != "none":
            entry["pretrain"].update(TINY_ATTMASK)
        entry["embed"].update(window=64, stride=64, batch_size=16)
    elif entry["kind"] == "saghog":
        for block, settings in TINY_SAGHOG.items():
            entry[block] = {**entry.get(block, {}), **settings}
    if entry["kind"] != "sift":
        entry["device"] = "cpu"
    if entry["kind"] == "vit":
        entry["aggregations"] = ["vlad"]  # the [CLS] sums are covered by the tiny-vit run
    return entry


def study_config(folder: Path) -> dict:
    """One config with every study's extractors (prefixed by the study) and experiments."""
    cfg = {"datasets": {"tiny": TINY, "ahawp": {"adapter": "words", "root": str(ahawp_subset(folder)), "labels": "labels.csv",
                                                "words_per_page": 12, "page_width": 800}},
           "preprocess": {"method": "sauvola", "window": 31, "k": 0.2},
           "features": {"sift": {"kind": "sift"}},
           "aggregation": {"codebook_size": 16, "codebook_sample": 20000},
           "shard_size": 30, "experiments": []}
    rename = {"demo": "tiny", "ahawp": "ahawp"}
    for prefix, name in STUDIES.items():
        study = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        # the untrained control is covered by the tiny-vit run
        names = {f: f if f == "sift" else f"{prefix}-{f}" for f in study["features"] if f != "random-vit"}
        cfg["features"].update({names[f]: shrink(study["features"][f]) for f in names if f != "sift"})
        for exp in study["experiments"]:
            cfg["experiments"].append({**exp, "dataset": rename[exp["dataset"]], "features": list(names.values()),
                                       **({"train_on": rename[exp["train_on"]]} if "train_on" in exp else {})})
    cfg["experiments"].append({"dataset": "tiny", "features": ["sift"], "encoding": ["none", "esvm"],
                               "rerank": ["none", "sgr"], "exclude_same": "page"})
    return cfg
