"""The plan of a workflow run: every stage variant of every experiment, built once from a validated config.

A variant is one folder of one stage (`results/<dataset>/<stage dir>/<name>-<hash>/`). Its
settings are split by the schema's `x-execution` marks into result settings, which decide what
the stage computes and are hashed into the folder name, and execution settings (devices,
inference batch sizes, workers, chunk sizes, checkpoint cadence), which are not: changing one of
those alone plans no job. The upstream folders a variant reads are its inputs, hashed with it.

The Snakefile reads the plan through named input functions (rules/common.smk); stage scripts
look their own variant up again (`Plan.job_variant`), which is how execution settings reach a
job without being Snakemake params (a param change re-runs a job).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import jsonschema

from .config import ConfigError, binarize_settings, dataset_hash, load_schema, settings_hash, uses_sam


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_digest(features: str, path: str) -> str:
    """The content hash of a `pretrain.init` checkpoint (a moved file keeps its folders)."""
    import os

    try:
        stat = os.stat(path)
    except OSError:
        raise ConfigError(f"features.{features}.pretrain.init: checkpoint {path!r} does not exist "
                          f"(relative paths start at the workflow's working directory {os.getcwd()})") from None
    return "sha256:" + _file_sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class Kind:
    """A feature kind: the stages its extractors go through, in order, and how they pool pages."""
    stages: tuple[str, ...]
    local: str | None        # suffix of the local descriptors VLAD encodes (None: no VLAD)
    pooled: tuple[str, str] | None  # suffixes of the per-shard "sum" vectors and of their doc_id table
    one_row_per_page: bool   # pooled vectors are page vectors already (else window rows summed per page)


KINDS = {
    "sift": Kind(("features", "codebook", "vlad"), local="desc.npy", pooled=None, one_row_per_page=True),
    "vit": Kind(("pretrain", "embed", "codebook", "vlad"), local="tokens.npy", pooled=("cls.npy", "parquet"),
                one_row_per_page=False),
    "saghog": Kind(("patches", "cluster", "pretrain", "finetune", "embed_patches"), local=None,
                   pooled=("pooled.npy", "pooled.parquet"), one_row_per_page=True),
}
# The folder under results/<dataset>/ each stage writes to (the three extractor stages share features/).
STAGE_DIRS = {"segment": "segment", "binarize": "binarize", "features": "features", "embed": "features",
              "embed_patches": "features", "patches": "patches", "cluster": "cluster", "pretrain": "pretrain",
              "finetune": "finetune", "codebook": "codebook", "vlad": "vlad", "descriptors": "descriptors",
              "esvm": "esvm", "rerank": "rerank", "experiment": "experiments"}
FEATURE_STAGES = ("features", "embed", "embed_patches")
# The stages whose folders an input role can name (others: the stage of the role's own name).
ROLE_STAGES = {"features": FEATURE_STAGES, "descriptors": ("descriptors", "esvm"), "whitening": ("descriptors",),
               "negatives": ("descriptors",)}
# Stages that learn from a train split: with an experiment's train_on, they come from that dataset.
FIT_STAGES = ("pretrain", "cluster", "finetune", "codebook")


def _frozen(obj):
    if isinstance(obj, dict):
        return MappingProxyType({k: _frozen(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return tuple(_frozen(v) for v in obj)
    return obj


def plain(obj):
    """A variant's settings as plain JSON-able dicts and lists (for params and settings.json)."""
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Variant:
    stage: str
    dataset: str
    name: str                      # readable part of the folder (extractor, method, ...)
    result: Mapping                # hashed
    execution: Mapping = field(default_factory=dict)   # not hashed
    inputs: Mapping = field(default_factory=dict)      # role -> upstream folder (hashed)
    labels: Mapping = field(default_factory=dict)      # descriptive facts (extractor, kind, ...), not hashed
    sources: Mapping = field(default_factory=dict)     # role -> dataset, for inputs of another dataset (hashed)

    def __post_init__(self):
        for name in ("result", "execution", "inputs", "labels", "sources"):
            object.__setattr__(self, name, _frozen(plain(getattr(self, name))))

    @functools.cached_property  # input functions ask for folders at every job: hash once
    def hash(self) -> str:
        transfer = [plain(self.sources)] if self.sources else []  # same-dataset folders keep their hashes
        return settings_hash(self.stage, plain(self.result), plain(self.inputs), *transfer)

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.hash}"

    def path(self, results: str, *parts: str) -> str:
        return "/".join([results, self.dataset, STAGE_DIRS[self.stage], self.folder, *parts])

    def record(self, **run) -> dict:
        """What settings.json holds: both kinds of settings, the inputs, and the facts of the run."""
        return {"stage": self.stage, "folder": self.folder, "result": plain(self.result),
                "execution": plain(self.execution), "inputs": plain(self.inputs), "sources": plain(self.sources),
                "labels": plain(self.labels), "run": run}


# --------------------------------------------------------------------------------------------
# Result / execution split, from the schema's x-execution marks
# --------------------------------------------------------------------------------------------

def _applicable(node: dict, instance, defs: dict):
    """The schema nodes that apply to `instance`: $ref followed, allOf entries, if/then branches taken."""
    if "$ref" in node:
        node = {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    yield node
    for sub in node.get("allOf", []):
        if "if" in sub:
            if jsonschema.Draft202012Validator(sub["if"]).is_valid(instance):
                yield from _applicable(sub.get("then", {}), instance, defs)
        else:
            yield from _applicable(sub, instance, defs)


def execution_paths(config: dict, schema: dict | None = None) -> frozenset[tuple[str, ...]]:
    """Key paths of the config that the schema marks `x-execution: true`."""
    schema = schema or load_schema()
    defs = schema.get("$defs", {})
    found = set()

    def walk(node, instance, path):
        for sub in _applicable(node, instance, defs):
            if sub.get("x-execution"):
                found.add(path)
            if not isinstance(instance, dict):
                continue
            props, extra = sub.get("properties", {}), sub.get("additionalProperties")
            for key, value in instance.items():
                child = props.get(key, extra if isinstance(extra, dict) else None)
                if child is not None:
                    walk(child, value, (*path, key))

    walk(schema, config, ())
    return frozenset(found)


class Plan:
    """Every stage variant of a validated config, built once; looked up by stage, dataset and folder."""

    def __init__(self, config: dict, schema: dict | None = None):
        self.config = config
        self._execution = execution_paths(config, schema)
        self._variants: dict[tuple[str, str, str], Variant] = {}
        self._by_hash: dict[tuple[str, str, str], Variant] = {}
        self._of_feature: dict[tuple[str, str, str], Variant] = {}
        self.experiments: list[Variant] = []
        for dataset in config["datasets"]:
            for variant in self._binarize_variants(dataset):
                self._add(variant)
            if uses_sam(config):
                self._add(self._segment(dataset))
        own, transfer = used_extractors(config)
        for dataset, features in own:
            self._add_feature(dataset, features)
        for dataset, features, train_on in transfer:  # apply what another dataset's train split fit
            self._add_feature(dataset, features, train_on)
        self._add_experiments()

    # Lookups ---------------------------------------------------------------------------------

    def variant(self, stage: str, dataset: str, folder: str) -> Variant:
        try:
            return self._variants[(stage, dataset, folder)]
        except KeyError:
            raise KeyError(f"no {stage} variant {folder!r} of dataset {dataset!r} in the plan") from None

    def variants(self, stage: str, dataset: str | None = None) -> list[Variant]:
        return [v for (s, d, _), v in self._variants.items() if s == stage and dataset in (None, d)]

    def of_feature(self, stage: str, dataset: str, features: str, aggregation: str | None = None,
                   train_on: str | None = None) -> Variant | None:
        """The `stage` variant extractor `features` uses on `dataset` (None: its kind skips the stage),
        fit on `train_on`'s train split (default: the dataset's own); descriptors are per aggregation."""
        return self._of_feature.get((stage, dataset, _user(features, aggregation, dataset, train_on)))

    def folders(self, stage: str) -> str:
        """Regex alternatives of the stage's folders (wildcard constraint of the rules that write them)."""
        names = sorted({v.folder for v in self.variants(stage)})
        return "|".join(map(re.escape, names)) or "(?!)"

    def main_binarize(self, dataset: str) -> Variant:
        """The binarization every later stage uses (preprocess.method)."""
        return self.variants("binarize", dataset)[0]

    def segment(self, dataset: str) -> Variant | None:
        found = self.variants("segment", dataset)
        return found[0] if found else None

    def input_of(self, variant: Variant, role: str) -> Variant:
        """The upstream variant a variant reads as `role` (features: whichever stage of its kind wrote them)."""
        folder, dataset = variant.inputs[role], variant.sources.get(role, variant.dataset)
        stages = ROLE_STAGES.get(role, (role,))
        return next(self._variants[key] for s in stages if (key := (s, dataset, folder)) in self._variants)

    def job_variant(self, stage: str, wildcards) -> Variant:
        return self.variant(stage, wildcards["dataset"], wildcards["folder"])

    # Splitting settings ---------------------------------------------------------------------

    def split(self, *path: str) -> tuple[dict, dict]:
        """(result, execution) parts of the config block at `path` (nested blocks split alike)."""
        block = self.config
        for key in path:
            block = block[key]
        return self._split(block, tuple(path))

    def _split(self, block: dict, path: tuple) -> tuple[dict, dict]:
        result, execution = {}, {}
        for key, value in block.items():
            where = (*path, key)
            if where in self._execution:
                execution[key] = value
            elif isinstance(value, dict) and any(p[:len(where)] == where for p in self._execution):
                result[key], execution[key] = self._split(value, where)
            else:
                result[key] = value
        return result, execution

    # Building --------------------------------------------------------------------------------

    def _add(self, variant: Variant, user: str | None = None) -> Variant:
        """Add a variant once: a stage variant with the settings and inputs of one already planned is
        that one, whatever its name (extractors and sweep variants share what they compute alike);
        experiments are rows, one per name. `user` names who uses the variant."""
        if variant.stage != "experiment":
            variant = self._by_hash.setdefault((variant.stage, variant.dataset, variant.hash), variant)
        key = (variant.stage, variant.dataset, variant.folder)
        self._variants.setdefault(key, variant)
        if user is not None:
            self._of_feature[(variant.stage, variant.dataset, user)] = self._variants[key]
        return self._variants[key]

    def _binarize_variants(self, dataset: str) -> list[Variant]:
        pre = self.config["preprocess"]
        found = []
        for method in [pre["method"], *[m for m in pre["compare"] if m != pre["method"]]]:
            inputs = {"dataset": dataset_hash(self.config, dataset)}
            if method.startswith("sam"):
                inputs["segment"] = self._segment(dataset).folder
            found.append(Variant("binarize", dataset, method, binarize_settings(pre, method), inputs=inputs))
        return found

    def _segment(self, dataset: str) -> Variant:
        result, execution = self.split("preprocess", "sam")
        return Variant("segment", dataset, "sam", result, execution,
                       inputs={"dataset": dataset_hash(self.config, dataset)})

    def _add_feature(self, dataset: str, features: str, train_on: str | None = None) -> None:
        """Plan an extractor on a dataset; with train_on, its learning stages are those of train_on."""
        kind = self.config["features"][features]["kind"]
        built = {"binarize": self.main_binarize(dataset)}
        user = _user(features, None, dataset, train_on)
        for stage in KINDS[kind].stages:
            if train_on and stage in FIT_STAGES:
                variant = self.of_feature(stage, train_on, features)
            else:
                variant = getattr(self, f"_{stage}")(dataset, features, built)
                variant = variant and _with_sources(variant, built.values())
            if variant is not None:
                built[stage] = self._add(variant, user)
        for aggregation in self.config["features"][features]["aggregations"]:
            descriptors = self._descriptors(dataset, features, aggregation, built, train_on)
            self._add(descriptors, _user(features, aggregation, dataset, train_on))

    def _feature_variant(self, stage, dataset, features, result, execution, inputs) -> Variant:
        kind = self.config["features"][features]["kind"]
        return Variant(stage, dataset, features, result, execution, inputs, labels={"features": features, "kind": kind})

    def _features(self, dataset, features, built) -> Variant:
        result, execution = self.split("features", features)
        # How pages are pooled later does not change the descriptors; the kind is the stage itself.
        for key in ("aggregations", "kind", "aggregation", "sweep_of"):
            result.pop(key, None)
        execution.pop("aggregation", None)  # the encoding chunk is VLAD's
        return self._feature_variant("features", dataset, features, result, execution,
                                     {"binarize": built["binarize"].folder})

    def _pretrain(self, dataset, features, built) -> Variant | None:
        feat = self.config["features"][features]
        if feat["pretrain"]["method"] == "none":
            return self._pretrained(dataset, features)
        result, execution = self.split("features", features, "pretrain")
        if "init" in result:
            result["init"], execution["init"] = checkpoint_digest(features, result["init"]), result["init"]
        # The effective batch decides the optimisation; how it is spread over GPUs does not.
        result["effective_batch_size"] = execution["batch_size"] * feat["gpus"]
        execution.update(device=feat["device"], gpus=feat["gpus"])
        result.update(model=feat["model"], seed=feat["seed"])
        if feat["kind"] == "saghog":
            inputs = {"patches": built["patches"].folder}
        else:
            inputs = {"binarize": built["binarize"].folder}
            if uses_sam(self.config):  # SAM's writing-amount filter chooses the training pages
                inputs["segment"] = self.segment(dataset).folder
        return Variant("pretrain", dataset, feat["pretrain"]["method"], result, execution, inputs)

    def _pretrained(self, dataset, features) -> Variant | None:
        """method none: the random init (no stage), or the checkpoint of `init` as it is."""
        feat = self.config["features"][features]
        init = feat["pretrain"].get("init")
        if init is None:
            if feat["kind"] == "saghog":
                raise ConfigError(f"features.{features}.pretrain: method none needs init (a SAGHOG encoder checkpoint)")
            return None
        result = {"method": "none", "init": checkpoint_digest(features, init), "kind": feat["kind"],
                  "model": feat["model"]}
        return Variant("pretrain", dataset, "none", result, {"init": init, "device": feat["device"], "gpus": 1}, {})

    def _embed(self, dataset, features, built) -> Variant:
        feat = self.config["features"][features]
        embed, embed_execution = self.split("features", features, "embed")
        inputs = {"binarize": built["binarize"].folder}
        if "pretrain" in built:
            inputs["pretrain"] = built["pretrain"].folder
        return self._feature_variant("embed", dataset, features, {**embed, "model": feat["model"], "seed": feat["seed"]},
                                     {**embed_execution, "device": feat["device"]}, inputs)

    def _patches(self, dataset, features, built) -> Variant:
        return Variant("patches", dataset, "patches", self.config["features"][features]["patches"],
                       inputs={"binarize": built["binarize"].folder})

    def _cluster(self, dataset, features, built) -> Variant:
        return Variant("cluster", dataset, "cluster", self.config["features"][features]["cluster"],
                       inputs={"patches": built["patches"].folder})

    def _finetune(self, dataset, features, built) -> Variant | None:
        feat = self.config["features"][features]
        if feat["finetune"]["method"] == "none":
            return None
        result, execution = self.split("features", features, "finetune")
        result.update(model=feat["model"], seed=feat["seed"])
        if result["validation_writers"]:  # the validation pages are embedded as embed_patches does
            result["power"] = feat["embed"]["power"]
        execution["device"] = feat["device"]
        return Variant("finetune", dataset, feat["finetune"]["method"], result, execution,
                       inputs={"pretrain": built["pretrain"].folder, "cluster": built["cluster"].folder,
                               "patches": built["patches"].folder})

    def _embed_patches(self, dataset, features, built) -> Variant:
        feat = self.config["features"][features]
        embed, embed_execution = self.split("features", features, "embed")
        inputs = {"patches": built["patches"].folder, "pretrain": built["pretrain"].folder}
        if "finetune" in built:  # the fine-tuned model's settings are in its folder's hash
            inputs["finetune"] = built["finetune"].folder
        return self._feature_variant("embed_patches", dataset, features, {**embed, "model": feat["model"]},
                                     {**embed_execution, "device": feat["device"]}, inputs)

    def _codebook(self, dataset, features, built) -> Variant | None:
        if "vlad" not in self.config["features"][features]["aggregations"]:
            return None
        result, _ = self.split("features", features, "aggregation")
        keys = ("codebook_size", "codebook_sample", "kmeans_iterations", "seed")
        return self._feature_variant("codebook", dataset, features, {k: result[k] for k in keys}, {},
                                     {"features": feature_folder(built)})

    def _vlad(self, dataset, features, built) -> Variant | None:
        if "codebook" not in built:
            return None
        result, execution = self.split("features", features, "aggregation")
        return self._feature_variant("vlad", dataset, features, {k: result[k] for k in ("intra_norm", "power")},
                                     {"chunk_size": execution["chunk_size"]},
                                     {"codebook": built["codebook"].folder, "features": feature_folder(built)})

    def _descriptors(self, dataset, features, aggregation, built, train_on=None) -> Variant:
        settings, _ = self.split("features", features, "aggregation")
        result = whitening_settings(settings)
        inputs = {"vlad": built["vlad"].folder} if aggregation == "vlad" else {"features": feature_folder(built)}
        upstream = list(built.values())
        if train_on and result["pca"] != "none" and result["pca_fit_on"] == "train":
            fitted = self.of_feature("descriptors", train_on, features, aggregation)
            inputs["whitening"] = fitted.folder  # the PCA fit on train_on's train split
            upstream.append(fitted)
        name = f"{features}-{aggregation}" + (f".from-{train_on}" if train_on else "")
        return _with_sources(Variant("descriptors", dataset, name, result, inputs=inputs,
                                     labels=self._row_labels(features, aggregation)), upstream)

    def _row_labels(self, features: str, aggregation: str) -> dict:
        feat = self.config["features"][features]
        settings = whitening_settings(feat["aggregation"])
        return {"features": features, "aggregation": aggregation, "kind": feat["kind"],
                "extractor": extractor_of(feat, features), "sweep": feat.get("sweep_of", {}).get("setting", ""),
                "pca": settings["pca"], "pca_fit_on": settings.get("pca_fit_on", "")}

    def _add_experiments(self) -> None:
        for exp in self.config["experiments"]:
            for features in exp["features"]:
                for aggregation in self.config["features"][features]["aggregations"]:
                    for encoding in exp["encoding"]:
                        for rerank in exp["rerank"]:
                            for graph in (exp["rerank_graph"] if rerank != "none" else ["none"]):
                                self._add_experiment(exp, features, aggregation, encoding, rerank, graph)

    def _encoded(self, exp: dict, features: str, aggregation: str, encoding: str) -> Variant:
        """The descriptors an experiment scores: as whitened, or their exemplar-SVM encoding."""
        dataset, train_on = exp["dataset"], exp.get("train_on")
        train_on = train_on if train_on != dataset else None
        descriptors = self.of_feature("descriptors", dataset, features, aggregation, train_on)
        if encoding == "none":
            return descriptors
        inputs, upstream = {"descriptors": descriptors.folder}, [descriptors]
        if train_on:  # the negatives are train_on's train documents
            negatives = self.of_feature("descriptors", train_on, features, aggregation)
            inputs["negatives"] = negatives.folder
            upstream.append(negatives)
        return self._add(_with_sources(Variant("esvm", dataset, descriptors.name, self.config["esvm"], inputs=inputs,
                                               labels=descriptors.labels), upstream))

    def _add_experiment(self, exp: dict, features: str, aggregation: str, encoding: str, rerank: str,
                        graph: str) -> None:
        dataset = exp["dataset"]
        train_on = exp.get("train_on", dataset)
        encoded = self._encoded(exp, features, aggregation, encoding)
        labels = {**self._row_labels(features, aggregation), "encoding": encoding, "rerank": rerank,
                  "rerank_graph": graph, "train_on": train_on}
        parts = [features, aggregation, *([encoding] if encoding != "none" else []), rerank,
                 *(["other_pages"] if graph == "other_pages" else [])]
        name = "-".join(parts) + (f".from-{train_on}" if train_on != dataset else "")
        inputs = {"descriptors": encoded.folder}
        if rerank != "none":
            reranked = self._add(Variant("rerank", dataset, name, {**self.config["rerank"][rerank], "graph": graph},
                                         inputs=inputs, labels=labels))
            inputs = {**inputs, "rerank": reranked.folder}
        variant = Variant("experiment", dataset, name,
                          {"exclude_same": exp["exclude_same"], "top_k": self.config["retrieval"]["top_k"],
                           "bootstrap": self.config["retrieval"]["bootstrap"]},
                          inputs=inputs, labels=labels)
        if (variant.stage, dataset, variant.folder) not in self._variants:
            self.experiments.append(self._add(variant))

    def path_of(self, experiment: Variant) -> list[Variant]:
        """Every variant on an experiment's path, each after its inputs (for provenance and code versions)."""
        found: list[Variant] = []

        def visit(variant: Variant) -> None:
            for role in variant.inputs:
                if role != "dataset":  # the dataset input is a hash of its settings, not a folder
                    visit(self.input_of(variant, role))
            if variant not in found:
                found.append(variant)

        visit(experiment)
        return found


def feature_folder(built: dict) -> str:
    """The folder of the extractor's page features, whichever stage of its kind wrote it."""
    return next(built[s].folder for s in FEATURE_STAGES if s in built)




def used_extractors(config: dict) -> tuple[list, list]:
    """(dataset, extractor) pairs the experiments fit and apply on one dataset, and (dataset, extractor,
    train_on) triples of the transfer experiments (whose train_on pairs are then in the first list)."""
    own, transfer = {}, {}
    for exp in config["experiments"]:
        train_on = exp.get("train_on", exp["dataset"])
        for features in exp["features"]:
            own[(train_on, features)] = None
            if train_on != exp["dataset"]:
                transfer[(exp["dataset"], features, train_on)] = None
    return list(own), list(transfer)


def used_datasets(config: dict) -> list[str]:
    """The datasets the experiments retrieve on or train on."""
    return sorted({d for exp in config["experiments"] for d in (exp["dataset"], exp.get("train_on", exp["dataset"]))})


def extractor_of(feat: dict, features: str) -> str:
    """The extractor a swept variant comes from (itself when not swept)."""
    return feat.get("sweep_of", {}).get("extractor", features)


def whitening_settings(aggregation: dict) -> dict:
    """The result settings of the descriptors stage: only the keys its whitening method reads."""
    method = aggregation["pca"]
    if method == "none":
        return {"pca": "none"}
    extra = {"shrink": ["pca_shrinkage"], "power": ["pca_power"]}.get(method, [])
    return {k: aggregation[k] for k in ["pca", "pca_dims", "pca_fit_on", "seed", *extra]}


def _user(features: str, aggregation: str | None, dataset: str, train_on: str | None) -> str:
    """Key of an extractor's (and aggregation's) variants on a dataset, fit on train_on."""
    user = f"{features}:{aggregation}" if aggregation else features
    return f"{user}@{train_on}" if train_on and train_on != dataset else user


def _with_sources(variant: Variant, upstream) -> Variant:
    """The variant with the datasets of its inputs that another dataset's stages wrote."""
    by_folder = {v.folder: v.dataset for v in upstream}
    sources = {role: by_folder[folder] for role, folder in variant.inputs.items()
               if by_folder.get(folder, variant.dataset) != variant.dataset}
    return dataclasses.replace(variant, sources=sources) if sources else variant
