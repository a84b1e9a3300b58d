"""Which PCA whitening should the descriptors stage use? Scores every option on the page vectors a
workflow run already computed, without re-running it.

For every descriptors variant under the given results folders (results/<dataset>/descriptors/<folder>/
settings.json names its input: a VLAD folder, or a feature folder whose window [CLS] tokens are summed
per page, or SAGHOG's pooled page vectors; read as scripts/pca.py reads them), each option is fitted
on the train split (all of it, and the first 25 % / 50 % of its writers, for the small-train case)
and the test split is scored with writer_retrieval.metrics.evaluate (leave-one-out cosine, the
experiment's exclude_same). One principal-axes decomposition per (variant, train subset) serves
every option (Whitening.fit(x, axes=...)).

    python bench/whitening.py results [more results folders] --out whitening.parquet

writes whitening.parquet (long table) and whitening.md (the table per train size, and per option
the change against no PCA and against whiten); prints both.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from writer_retrieval.normalise import power_l2  # noqa: E402
from writer_retrieval.pca import Whitening, principal_axes, sum_pooled_cls  # noqa: E402
from writer_retrieval.metrics import evaluate  # noqa: E402

# (option label, method, keyword arguments of Whitening, variant: False; True = in-span only; "l2";
# ("target", mean | gm)). The in-span options are
# references the stage does not offer: shrink scales with the unspanned rest of the space projected
# away (as whiten and power do), and the plain rotation (equal scales) / centring only.
OPTIONS = [("none", "none", {}, False)]
OPTIONS += [("whiten", "whiten", {}, False)]
OPTIONS += [("whiten guard 1e-8", "whiten", {"rank_tolerance": 1e-8}, False)]
OPTIONS += [(f"shrink {lam:g}", "shrink", {"shrinkage": lam}, False) for lam in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)]
OPTIONS += [(f"power {p:g}", "power", {"power": p}, False) for p in (0.1, 0.2, 0.25, 0.3, 0.4)]
OPTIONS += [(f"ref: shrink {lam:g} in-span", "shrink", {"shrinkage": lam}, True) for lam in (0.01, 0.1, 1.0)]
OPTIONS += [("ref: rotation", "shrink", {"shrinkage": 1e9}, True)]  # PCA projection, equal scales
OPTIONS += [("ref: centring", "shrink", {"shrinkage": 1e9}, False)]  # x - train mean, then L2
# Page vectors L2-normalised before the fit and the transform (VLAD and SAGHOG vectors already are;
# summed [CLS] tokens are not): does the page's window count in the vector's length matter?
OPTIONS += [(f"ref: L2 first, shrink {lam:g}", "shrink", {"shrinkage": lam}, "l2") for lam in (0.1, 1.0)]
# The shrinkage target relative to another typical eigenvalue than the median (the stage's): the
# mean (which a dominant first component sets) and the geometric mean.
OPTIONS += [(f"ref: shrink {lam:g} x mean", "shrink", {"shrinkage": lam}, ("target", "mean")) for lam in (0.1, 1.0)]
OPTIONS += [(f"ref: shrink {lam:g} x geo-mean", "shrink", {"shrinkage": lam}, ("target", "gm")) for lam in (0.1, 1.0)]
FRACTIONS = (0.25, 0.5, 1.0)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def shard_pairs(folder: Path, vectors: str, index: str) -> list[tuple[Path, Path]]:
    """(vectors, doc-id table) per shard, e.g. ('0001.npy', '0001.parquet') or ('.cls.npy', '.parquet')."""
    pairs = []
    for v in sorted((folder / "shards").glob(f"[0-9][0-9][0-9][0-9]{vectors}")):
        shard = v.name[:4]
        pairs.append((v, folder / "shards" / f"{shard}{index}"))
    if not pairs:
        raise FileNotFoundError(f"no {vectors} shards in {folder / 'shards'}")
    return pairs


def page_vectors(dataset_dir: Path, settings: dict) -> tuple[list[str], np.ndarray]:
    """The descriptors stage's input: (doc ids, N x D pre-PCA page vectors), as scripts/pca.py reads them."""
    inputs = settings["inputs"]
    if "vlad" in inputs:
        pairs = shard_pairs(dataset_dir / "vlad" / inputs["vlad"], ".npy", ".parquet")
        doc_ids = pd.concat([pd.read_parquet(i) for _, i in pairs]).doc_id.tolist()
        return doc_ids, np.concatenate([np.load(v) for v, _ in pairs])
    folder = dataset_dir / "features" / inputs["features"]
    if list((folder / "shards").glob("*.pooled.npy")):  # SAGHOG: one pooled row per page already
        pairs = shard_pairs(folder, ".pooled.npy", ".pooled.parquet")
        doc_ids = pd.concat([pd.read_parquet(i) for _, i in pairs]).doc_id.tolist()
        return doc_ids, np.concatenate([np.load(v) for v, _ in pairs])
    pooled = {}
    for v, i in shard_pairs(folder, ".cls.npy", ".parquet"):
        pooled.update(sum_pooled_cls(v, i))
    doc_ids = list(pooled)
    return doc_ids, np.stack([pooled[d] for d in doc_ids])


def stage_result(dataset_dir: Path, folder: str) -> tuple[str, float | None]:
    """exclude_same and mAP of the workflow's rerank-free experiment on these descriptors (a check)."""
    for path in sorted((dataset_dir / "experiments").glob("*/settings.json")):
        exp = read_json(path)
        if exp["inputs"].get("descriptors") == folder and "rerank" not in exp["inputs"]:
            metrics = path.parent / "metrics.parquet"
            value = float(pd.read_parquet(metrics)["map"].iloc[0]) if metrics.exists() else None
            return exp["result"]["exclude_same"], value
    return "none", None


def score_variant(dataset_dir: Path, desc_dir: Path, fractions=FRACTIONS, options=OPTIONS) -> list[dict]:
    settings = read_json(desc_dir / "settings.json")
    labels, result = settings["labels"], settings["result"]
    doc_ids, x = page_vectors(dataset_dir, settings)
    index = pd.read_parquet(dataset_dir / "index.parquet").set_index("doc_id").loc[doc_ids]
    split = index.split.to_numpy()
    test = split == "test"
    exclude_same, stage_map = stage_result(dataset_dir, settings["folder"])
    pages = index.page.to_numpy() if "page" in index else None
    train_writers = pd.unique(index.writer[split == "train"])  # index order
    rows = []
    x_l2 = power_l2(np.asarray(x, np.float64))
    for fraction in fractions:
        n_writers = max(1, int(round(fraction * len(train_writers))))
        fit = (split == "train") & np.isin(index.writer.to_numpy(), train_writers[:n_writers])
        axes = {}
        for label, method, kwargs, variant in options:
            key = variant == "l2"
            rows_of = x_l2 if key else x
            model = Whitening(result["pca_dims"], result["seed"], method, **kwargs)
            if method != "none" and fit.sum() < 2:
                continue
            if method != "none" and key not in axes:  # one decomposition per input, shared by the options
                axes[key] = principal_axes(rows_of[fit], result["pca_dims"], result["seed"])
            model.fit(rows_of[fit], axes=axes.get(key))
            if variant is True:  # in-span only
                model.residual_scale_ = 0.0
            elif isinstance(variant, tuple):  # another target: var = scale ** -2 - median target
                var = model.scale_ ** -2.0 - model.residual_scale_ ** -2.0
                ref = var.mean() if variant[1] == "mean" else np.exp(np.log(var).mean())
                model.scale_ = 1.0 / np.sqrt(var + model.shrinkage * ref)
                model.residual_scale_ = 1.0 / np.sqrt(model.shrinkage * ref)
            metrics, _ = evaluate(model.transform(rows_of[test]), index.writer.to_numpy()[test],
                                  pages[test] if pages is not None else None, exclude_same, top_k=10)
            rows.append({"dataset": dataset_dir.name, "features": labels["features"],
                         "aggregation": labels["aggregation"], "kind": labels["kind"],
                         "descriptors": settings["folder"], "input_dim": x.shape[1],
                         "train_fraction": fraction, "fit_writers": n_writers, "n_fit": int(fit.sum()),
                         "option": label, "method": method, "value": model.regularisation,
                         "components": int(model.components_.shape[0]), "dims": model.output_dim,
                         "map": metrics["map"], "top1": metrics["top1"], "n_queries": metrics["n_queries"],
                         "stage_map": stage_map})
    return rows


def descriptor_variants(results: list[Path]):
    for root in results:
        for path in sorted(root.glob("*/descriptors/*/settings.json")):
            yield path.parent.parent.parent, path.parent


def markdown(table: pd.DataFrame) -> str:
    out = []
    table = table.assign(extractor=table.features + "/" + table.aggregation)
    order = [o for o, *_ in OPTIONS]
    for fraction, part in table.groupby("train_fraction", sort=False):
        nfit = part.groupby(["dataset", "extractor"]).n_fit.first()
        wide = part.pivot_table(index="option", columns=["dataset", "extractor"], values="map").reindex(order)
        out.append(f"### Train writers: {fraction:.0%} (n_fit: "
                   + ", ".join(f"{d} {e} {n}" for (d, e), n in nfit.items()) + ")\n")
        wide.columns = [f"{d} {e}" for d, e in wide.columns]
        out.append(wide.round(4).to_markdown() + "\n")
    none = table[table.option == "none"].set_index(["dataset", "extractor", "train_fraction"])["map"]
    whiten = table[table.option == "whiten"].set_index(["dataset", "extractor", "train_fraction"])["map"]
    keyed = table.set_index(["dataset", "extractor", "train_fraction"])
    # Regret: the best option the stage offers (not a reference) in that cell, minus this option.
    offered = keyed[~keyed.option.str.startswith("ref:")]
    best = offered.groupby(level=[0, 1, 2])["map"].max()
    summary = []
    for option in order:
        part = keyed[keyed.option == option]["map"]
        d_none = part - none.reindex(part.index)
        d_whiten = part - whiten.reindex(part.index)
        small = d_none[d_none.index.get_level_values("train_fraction") < 1]
        regret = best.reindex(part.index) - part
        summary.append({"option": option, "mean mAP": part.mean(), "worst vs none": d_none.min(),
                        "worst vs none (25/50 % train)": small.min(), "mean vs none": d_none.mean(),
                        "mean vs whiten": d_whiten.mean(), "worst vs whiten": d_whiten.min(),
                        "mean regret": regret.mean(), "worst regret": regret.max(), "cells": len(part)})
    out.append("### Per option, over every dataset x extractor x train size\n\n(regret: the best option "
               "the stage offers in that cell minus this one; refs are not offered)\n")
    out.append(pd.DataFrame(summary).set_index("option").round(4).to_markdown() + "\n")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", type=Path, help="results folders of workflow runs")
    parser.add_argument("--table", type=Path, help="re-render the markdown of a table this script wrote")
    parser.add_argument("--out", type=Path, required=True, help="table path (.parquet; .md written next to it)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    if args.table:
        text = markdown(pd.read_parquet(args.table))
        args.out.with_suffix(".md").write_text(text)
        print(text)
        return 0
    rows = []
    for dataset_dir, desc_dir in descriptor_variants(args.results):
        got = score_variant(dataset_dir, desc_dir)
        full = [r for r in got if r["option"] == "whiten" and r["train_fraction"] == 1.0]
        check = f"; workflow experiment mAP {full[0]['stage_map']:.4f}" if full and full[0]["stage_map"] else ""
        print(f"{dataset_dir.name} {desc_dir.name}: whiten on the full train split {full[0]['map']:.4f}{check}"
              if full else f"{dataset_dir.name} {desc_dir.name}", flush=True)
        rows += got
    if not rows:
        print("no descriptors variants found", file=sys.stderr)
        return 1
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(args.out.with_suffix(".parquet"), index=False)
    text = markdown(table)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
