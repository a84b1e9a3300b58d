"""Learning curves of the self-supervised extractors on CPU: mAP against training time.

    python bench/ssl_curve.py [--config configs/zoo.yaml] [--budgets 0 3 8 15 25]
                              [--workdir /tmp/ssl-curve] [--out zoo] [--threads 1] [--phase all]

Trains every pretrained extractor of the config (AttMask, flip, SAGHOG) on the synthetic demo
collection's train split, each in its own process with `--threads` torch threads, in parallel.
Training runs epoch by epoch through the project's own loop (resuming its checkpoint); a snapshot
of the network is kept when the process's CPU time first passes each budget (core-minutes: on an
otherwise idle 2-core machine with --threads 2, minutes = core-minutes / 2). Budget 0 is the
untrained network (the control).

Then every snapshot is scored by the workflow itself, as `pretrain: {method: none, init: <snapshot>}`
rows (SAGHOG also with the demo's NetRVLAD fine-tuning on top), on (a) the demo test split and
(b) AHAWP pseudo-pages (transfer from synthetic to real writing), next to SIFT. Writes to --out:
curve.parquet / curve.md (mAP, Top-1 per snapshot and collection) and curve.png; the last snapshot
of each extractor with its settings and training log under <out>/<feature>/ (the zoo).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
AHAWP = REPO.parent / "shared" / "data" / "ahawp-words"
DATASETS = ("demo", "ahawp")  # the demo test split; AHAWP pseudo-pages (transfer to real writing)


def snakemake(workdir: Path, configfile: Path, *args: str) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(configfile),
           "--cores", "2", "--rerun-incomplete", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def load_config(path: Path) -> dict:
    from writer_retrieval.config import validate_config

    return validate_config(yaml.safe_load(path.read_text()))


def pretrained_features(config: dict) -> list[str]:
    return [name for name, feat in config["features"].items()
            if feat["kind"] != "sift" and feat["pretrain"]["method"] != "none"]


# --------------------------------------------------------------------------------------------
# Training with snapshots
# --------------------------------------------------------------------------------------------

def training_job(config: dict, workdir: Path, feature: str) -> tuple[dict, dict]:
    """(inputs, settings) of the feature's pretrain job, as the workflow's rule would give them."""
    import pandas as pd

    from writer_retrieval.jobs import merged
    from writer_retrieval.plan import Plan, plain

    plan = Plan(config)
    dataset = config["experiments"][0]["dataset"]
    variant = plan.of_feature("pretrain", dataset, feature)
    index = pd.read_parquet(workdir / "results" / dataset / "index.parquet")
    train_ids = index.loc[index.split == "train", "doc_id"].tolist()
    if "patches" in variant.inputs:
        folder = Path(workdir, plan.input_of(variant, "patches").path("results", "shards"))
        shards = sorted(folder.glob("*.patches.npy"))
        inputs = {"patch_shards": [[str(p), str(p).replace(".patches.npy", ".parquet")] for p in shards],
                  "doc_ids": train_ids}
    else:
        stats = pd.read_parquet(workdir / plan.main_binarize(dataset).path("results", "stats.parquet"))
        masks = stats.set_index("doc_id").mask_path
        inputs = {"page_masks": [str(workdir / m) if not Path(m).is_absolute() else m for m in masks.loc[train_ids]]}
    return inputs, merged(plain(variant.result), plain(variant.execution))


def training_data(config: dict) -> list[str]:
    """The files the pretraining jobs read: the main binarization and the SAGHOG patches."""
    from writer_retrieval.plan import Plan

    plan = Plan(config)
    dataset = config["experiments"][0]["dataset"]
    found = [plan.main_binarize(dataset).path("results", "stats.parquet")]
    found += [v.path("results", "stats.parquet") for v in plan.variants("patches", dataset)]
    return found


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_with_snapshots(config: dict, workdir: Path, feature: str, budgets: list[float], out: Path) -> None:
    """Train `feature` epoch by epoch; after the epoch that passes each budget (core-minutes) save
    <out>/<budget>.pt (the exported network) and record the time in snapshots.json."""
    from writer_retrieval.pretrain import initial_weights, run, trained_weights

    inputs, settings = training_job(config, workdir, feature)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    import torch

    torch.save(initial_weights(settings), out / "0.pt")
    done = [{"budget": 0, "core_minutes": 0.0, "epoch": 0, "train_seconds": 0.0}]
    start, epoch = cpu_seconds(), 0
    pending = sorted(b for b in budgets if b > 0)
    while pending and epoch < int(settings["epochs"]):
        epoch += 1
        run(inputs, settings, run_dir, device="cpu", progress=False, stop_after_epochs=epoch)
        used = (cpu_seconds() - start) / 60
        print(f"{feature}: epoch {epoch}, {used:.1f} core-minutes", flush=True)
        if used >= pending[0] or epoch == int(settings["epochs"]):
            budget = pending.pop(0)
            while pending and used >= pending[0]:
                pending.pop(0)
            torch.save(trained_weights(run_dir / "checkpoint.pt", settings["method"]), out / f"{budget:g}.pt")
            done.append({"budget": budget, "core_minutes": used, "epoch": epoch, "train_seconds": None})
            (out / "snapshots.json").write_text(json.dumps(done, indent=1))
    (out / "snapshots.json").write_text(json.dumps(done, indent=1))


# --------------------------------------------------------------------------------------------
# Scoring through the workflow
# --------------------------------------------------------------------------------------------

def snapshot_name(config: dict, feature: str, snap: dict, finetuned: bool = False) -> str:
    """<feature>[-ft].t<budget>; budget 0 (the seeded random init, the same network for every extractor
    of one kind and model) is scored once, under the first such extractor's name."""
    kind = config["features"][feature]["kind"]
    if snap["budget"] == 0:
        feature = next(name for name in pretrained_features(config) if config["features"][name]["kind"] == kind)
    return f"{feature}{'-ft' if finetuned else ''}.t{snap['budget']:g}"


def snapshot_features(config: dict, feature: str, snapshots: list[dict], kept: Path, budgets,
                      finetune: bool = True) -> dict:
    """Workflow features of the snapshots with a budget in `budgets`, {name: (settings, datasets)}: the
    extractor's settings with pretrain = {none, init}, scored on the demo. The untrained network and
    the last snapshot are also scored on the transfer set. SAGHOG embeds every patch of a page (about
    6 core-minutes per 64 demo pages), so it is scored at those two points only, on the demo only."""
    feat = config["features"][feature]
    found = {}
    for snap in snapshots:
        ends = snap is snapshots[0] or snap is snapshots[-1]
        if snap["budget"] not in budgets or (feat["kind"] == "saghog" and not ends):
            continue
        base = {k: v for k, v in feat.items() if k not in ("pretrain", "finetune")}
        base["pretrain"] = {"method": "none", "init": str((kept / feature / f"{snap['budget']:g}.pt").resolve())}
        datasets = ["demo", "ahawp"] if ends and feat["kind"] != "saghog" else ["demo"]
        found[snapshot_name(config, feature, snap)] = (base, datasets)
        if feat["kind"] == "saghog" and finetune:
            found[snapshot_name(config, feature, snap, True)] = ({**base, "finetune": FINETUNE}, datasets)
    return found


# The demo grid's fine-tuning (configs/benchmark-demo.yaml, saghog-ft), applied to every SAGHOG snapshot.
FINETUNE = yaml.safe_load((REPO / "configs" / "benchmark-demo.yaml").read_text())["features"]["saghog-ft"]["finetune"]


def scoring_config(config: dict, features: dict, dataset: str) -> dict:
    """A workflow config that scores the snapshot features meant for `dataset` next to SIFT (one
    dataset per run: the workflow plans every extractor of a config on every dataset of it)."""
    if dataset == "ahawp":
        settings = yaml.safe_load((REPO / "configs" / "ahawp.yaml").read_text())["datasets"]["ahawp"]
        settings["root"] = str(AHAWP)
    else:
        settings = config["datasets"][dataset]
    chosen = {name: feat for name, (feat, datasets) in features.items() if dataset in datasets}
    return {"datasets": {dataset: settings},
            "preprocess": {k: config["preprocess"][k] for k in ("method", "window", "k")},
            "features": {"sift": {"kind": "sift"}, **chosen},
            "aggregation": {k: config["aggregation"][k] for k in ("codebook_size", "pca_dims", "pca_fit_on")},
            "experiments": [{"dataset": dataset, "features": ["sift", *chosen], "rerank": ["none"]}]}


def curve_table(config: dict, workdir: Path, snapshots: dict):
    import pandas as pd

    bench = pd.concat([pd.read_parquet(workdir / f"benchmark-{d}.parquet") for d in DATASETS])
    rows = []
    for feature, snaps in snapshots.items():
        aggregations = config["features"][feature]["aggregations"]
        for snap in snaps:
            for extractor, finetuned in ((feature, False), (f"{feature}-ft", True)):
                hit = bench[(bench.features == snapshot_name(config, feature, snap, finetuned))
                            & bench.aggregation.isin(aggregations)]
                for _, r in hit.iterrows():
                    rows.append({"extractor": extractor, "budget": snap["budget"],
                                 "core_minutes": snap["core_minutes"], "epoch": snap["epoch"],
                                 "dataset": r.dataset, "aggregation": r.aggregation, "map": r["map"],
                                 "top1": r["top1"]})
    table = pd.DataFrame(rows).sort_values(["dataset", "extractor", "budget"])
    sift = bench[bench.features == "sift"].set_index("dataset")["map"].to_dict()
    return table, sift


def plot_curve(table, sift: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(table.dataset.unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        part = table[table.dataset == dataset]
        for extractor, rows in part.groupby("extractor"):
            line, = ax.plot(rows.core_minutes, rows["map"], marker="o", label=extractor)
            ax.axhline(rows["map"].iloc[0], color=line.get_color(), ls=":", lw=1)  # the untrained control
        ax.axhline(sift[dataset], color="k", ls="--", label="SIFT + VLAD")
        ax.set(title=f"{dataset}: mAP against training time (dotted: untrained)", xlabel="training core-minutes",
               ylabel="mAP")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def score(config: dict, workdir: Path, kept: Path, out: Path, features: list[str], budgets, finetune: bool) -> None:
    snapshots = {f: json.loads((kept / f / "snapshots.json").read_text()) for f in features}
    rows = {}
    for feature in features:
        rows.update(snapshot_features(config, feature, snapshots[feature], kept, budgets, finetune))
    for dataset in DATASETS:
        cfg = workdir / f"score-{dataset}.yaml"
        cfg.write_text(yaml.safe_dump(scoring_config(config, rows, dataset), sort_keys=False))
        snakemake(workdir, cfg)
        shutil.copy(workdir / "results" / "benchmark.parquet", workdir / f"benchmark-{dataset}.parquet")
    table, sift = curve_table(config, workdir, snapshots)
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "curve.parquet", index=False)
    lines = [f"SIFT + VLAD: " + ", ".join(f"{d} {m:.3f}" for d, m in sorted(sift.items())), "",
             table.to_markdown(index=False, floatfmt=".3f")]
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    plot_curve(table, sift, out / "curve.png")
    print("\n".join(lines))


def keep_zoo(config: dict, kept: Path, out: Path, features: list[str], config_path: Path) -> None:
    """The last snapshot of each extractor as <out>/<feature>/backbone.pt, with its settings and its
    training log up to that snapshot."""
    import pandas as pd
    import torch

    for feature in features:
        folder = out / feature
        folder.mkdir(parents=True, exist_ok=True)
        last = json.loads((kept / feature / "snapshots.json").read_text())[-1]
        shutil.copy(kept / feature / f"{last['budget']:g}.pt", folder / "backbone.pt")
        ckpt = torch.load(kept / feature / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)
        log = pd.DataFrame(ckpt["log"])
        log[log.epoch <= last["epoch"]].to_parquet(folder / "log.parquet", index=False)
        settings = {"feature": feature, "config": str(config_path.relative_to(REPO)), "snapshot": last,
                    "settings": config["features"][feature]}
        (folder / "settings.json").write_text(json.dumps(settings, indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", nargs="?", default="all", choices=["all", "prepare", "train", "score", "zoo"])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "zoo.yaml")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0, 3, 8, 15, 25])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ssl-curve"))
    parser.add_argument("--snapshots", type=Path, help="where snapshots are kept (default: <workdir>/snapshots)")
    parser.add_argument("--out", type=Path, default=REPO / "zoo", help="the curve and the zoo")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-finetune", action="store_true", help="score SAGHOG without its NetRVLAD rows")
    parser.add_argument("--score-budgets", type=float, nargs="+", help="the snapshots to score (default: all)")
    parser.add_argument("--features", nargs="+", help="default: every pretrained extractor of the config")
    args = parser.parse_args()
    config = load_config(args.config)
    features = args.features or pretrained_features(config)
    kept = args.snapshots or args.workdir / "snapshots"
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.phase in ("all", "prepare"):
        snakemake(args.workdir, args.config.resolve(), *training_data(config))
    if args.phase == "train" and len(features) == 1:
        import torch

        torch.set_num_threads(args.threads)
        train_with_snapshots(config, args.workdir, features[0], args.budgets, kept / features[0])
        return
    if args.phase in ("all", "train"):
        t0 = time.time()
        procs = [subprocess.Popen([sys.executable, __file__, "train", "--features", f, "--config", str(args.config),
                                   "--budgets", *map(str, args.budgets), "--workdir", str(args.workdir),
                                   "--snapshots", str(kept), "--threads", str(args.threads)]) for f in features]
        if any(p.wait() for p in procs):
            sys.exit("a training process failed")
        print(f"training: {(time.time() - t0) / 60:.1f} min wall", flush=True)
    if args.phase in ("all", "score"):
        score(config, args.workdir, kept, args.out, features, args.score_budgets or args.budgets,
              not args.no_finetune)
    if args.phase in ("all", "zoo"):
        keep_zoo(config, kept, args.out, features, args.config.resolve())


if __name__ == "__main__":
    main()
