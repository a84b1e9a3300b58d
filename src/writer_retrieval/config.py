"""Configuration: JSON-schema validation with readable errors, defaults, and settings hashes."""
from __future__ import annotations

import ast
import copy
import difflib
import hashlib
import json
import os
from importlib import resources
from typing import Any

import jsonschema
import yaml

from .errors import InputError


class ConfigError(InputError):
    """A configuration problem, with a message that names the key and what is allowed."""


def load_schema() -> dict:
    schema = yaml.safe_load(resources.files("writer_retrieval").joinpath("config.schema.yaml").read_text())
    defs = schema.get("$defs", {})

    def copy_ref_defaults(node):
        # A property given as {$ref: ...} takes the default of the definition it points to.
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            target = defs.get(ref.rsplit("/", 1)[-1]) if ref.startswith("#/$defs/") else None
            if isinstance(target, dict) and "default" in target and "default" not in node:
                node["default"] = copy.deepcopy(target["default"])
            for value in node.values():
                copy_ref_defaults(value)
        elif isinstance(node, list):
            for value in node:
                copy_ref_defaults(value)

    copy_ref_defaults(schema)
    return schema


def _with_defaults(validator_class):
    """Extend a validator so that validating also fills in the schema's defaults."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_DefaultFillingValidator = _with_defaults(jsonschema.Draft202012Validator)


def _key(path) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in path]
    return ".".join(parts).replace(".[", "[") or "(top level)"


def _describe(error: jsonschema.ValidationError, schema: dict) -> str:
    key = _key(error.absolute_path)
    kind = error.validator
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted((error.schema.get("properties") or {}).keys())
        unknown = [k for k in error.instance if k not in allowed]
        lines = []
        for k in unknown:
            full = f"{key}.{k}" if error.absolute_path else k
            hint = difflib.get_close_matches(k, allowed, n=1)
            lines.append(f"unknown key '{full}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        where = f"'{key}'" if error.absolute_path else "the top level"
        return "; ".join(lines) + f". Allowed keys in {where}: {', '.join(allowed)}"
    if kind == "enum":
        return f"'{key}' = {error.instance!r} is not allowed; allowed: {', '.join(map(str, error.validator_value))}"
    if kind == "const":
        return f"'{key}' must be {error.validator_value!r}"
    if kind == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        if "root" in missing and key.startswith("datasets."):
            return _missing_root(key.split(".", 1)[1])
        return f"'{key}' is missing the required key(s): {', '.join(missing)}"
    if kind == "type":
        return f"'{key}' = {error.instance!r} must be of type {error.validator_value}"
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        word = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[kind]
        return f"'{key}' = {error.instance!r} must be {word} {error.validator_value}"
    if kind == "oneOf" and isinstance(error.instance, dict):
        options = [" + ".join(s.get("required", [])) for s in error.validator_value]
        return f"'{key}' needs exactly one of: {', '.join(repr(o) for o in options)}"
    if kind == "propertyNames":
        return f"'{key}': name {error.instance!r} is not allowed (letters, digits, _ . - only)"
    if kind in ("minItems", "minProperties"):
        return f"'{key}' must not be empty"
    return f"'{key}': {error.message}"


def _root_example(dataset: str) -> str:
    return (f"Set it in the config file (root: /data/{dataset}) or on the command line: "
            f"--config 'datasets={{{dataset}: {{root: /data/{dataset}}}}}'")


def _missing_root(dataset: str) -> str:
    return f"'datasets.{dataset}.root' is required: the folder where the {dataset} files are. " + _root_example(dataset)


def check_dataset_roots(config: dict, datasets) -> None:
    """Stop before any job when a used dataset's root folder does not exist (validated config)."""
    messages = []
    for name in datasets:
        root = config["datasets"][name].get("root")
        if root is not None and not os.path.isdir(root):
            messages.append(f"'datasets.{name}.root' = {root!r}: no such folder (relative paths start at the "
                            f"workflow's working directory {os.getcwd()}). " + _root_example(name))
    if messages:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(messages))


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Validate `config` against the schema and return a copy with defaults filled in.

    Raises ConfigError listing every problem (key and what is allowed).
    """
    schema = schema or load_schema()
    filled = expand_features(copy.deepcopy(dict(config)))
    validator = _DefaultFillingValidator(schema)
    errors = sorted(validator.iter_errors(filled), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    # An if/then branch failing reports both the branch error and nothing useful at the top: keep leaves.
    messages = []
    for err in errors:
        msg = _describe(err, schema)
        if msg not in messages:
            messages.append(msg)
    if not messages:
        names = set(filled["datasets"])
        for i, exp in enumerate(filled["experiments"]):
            if exp["dataset"] not in names:
                messages.append(f"'experiments[{i}].dataset' = {exp['dataset']!r} is not a key of 'datasets'; "
                                f"allowed: {', '.join(sorted(names))}")
        for name, ds in filled["datasets"].items():
            if ds["adapter"] == "synthetic" and ds["train_writers"] >= ds["writers"]:
                messages.append(f"'datasets.{name}.train_writers' = {ds['train_writers']} must be smaller than "
                                f"'datasets.{name}.writers' = {ds['writers']} (the test split needs writers)")
        for i, exp in enumerate(filled["experiments"]):
            for name in exp["rerank"]:
                if name != "none" and name not in filled["rerank"]:
                    messages.append(f"'experiments[{i}].rerank' names {name!r}, which is neither 'none' nor a key "
                                    f"of 'rerank'; allowed: none, {', '.join(sorted(filled['rerank']))}")
            exp.setdefault("features", sorted(filled["features"]))
            for name in exp["features"]:
                if name not in filled["features"]:
                    messages.append(f"'experiments[{i}].features' names {name!r}, which is not a key of 'features'; "
                                    f"allowed: {', '.join(sorted(filled['features']))}")
        messages += _experiment_axis_problems(filled)
        for feat in filled["features"].values():  # the schema's default extractors had no block yet
            feat.setdefault("aggregation", copy.deepcopy(filled["aggregation"]))
        pre = filled["preprocess"]
        sam = pre["sam"]
        if uses_sam(filled) and not sam["random_weights_for_testing"]:
            from .segment import check_checkpoint  # a missing checkpoint stops the run before any job

            try:
                check_checkpoint(sam["model_type"], sam["checkpoint"])
            except InputError as exc:
                messages.append(str(exc))
        if sam["image_size"] is not None and not sam["random_weights_for_testing"]:
            messages.append("'preprocess.sam.image_size' is for testing with random weights only; remove it")
        if pre["window"] % 2 == 0:
            messages.append(f"'preprocess.window' = {pre['window']} must be odd")
    if messages:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(messages))
    return _key_sorted(filled)


def _experiment_axis_problems(config: dict) -> list[str]:
    """train_on must name a dataset; the other_pages rerank graph needs exclude_same page (fills its default)."""
    messages = []
    for i, exp in enumerate(config["experiments"]):
        if "train_on" in exp and exp["train_on"] not in config["datasets"]:
            messages.append(f"'experiments[{i}].train_on' = {exp['train_on']!r} is not a key of 'datasets'; "
                            f"allowed: {', '.join(sorted(config['datasets']))}")
        page = exp["exclude_same"] == "page"
        exp.setdefault("rerank_graph", ["all", "other_pages"] if page else ["all"])
        if "other_pages" in exp["rerank_graph"] and not page:
            messages.append(f"'experiments[{i}].rerank_graph' other_pages leaves same-page documents out of the "
                            f"rerank graph, which needs 'experiments[{i}].exclude_same' = 'page'")
    return messages


# --------------------------------------------------------------------------------------------
# Sweeps and per-extractor aggregation (on the config as written, before the schema fills defaults)
# --------------------------------------------------------------------------------------------

def expand_features(config: dict) -> dict:
    """Give every extractor its aggregation block (the top-level one, overridden by its own) and
    replace each swept extractor by one variant per combination of values (named
    <extractor>.<last key>-<value>), in the extractors and in the experiments that list it."""
    features, top = config.get("features"), config.get("aggregation", {})
    if not isinstance(features, dict) or not isinstance(top, dict):
        return config  # malformed: the schema names the problem
    expanded, variants_of = {}, {}
    for name, entry in features.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("aggregation", {}), dict):
            expanded[name] = entry
            continue
        entry = {**entry, "aggregation": {**copy.deepcopy(top), **entry.get("aggregation", {})}}
        sweep = entry.pop("sweep", None)
        variants = sweep_variants(name, entry, sweep) if sweep is not None else {name: entry}
        variants_of[name] = list(variants)
        for variant in variants:
            if variant in expanded or (variant != name and variant in features):
                raise ConfigError(f"invalid configuration:\n  - sweep of 'features.{name}' makes the extractor "
                                  f"name {variant!r}, which already exists; rename one of them")
        expanded.update(variants)
    config["features"] = expanded
    for exp in config.get("experiments") or []:
        if isinstance(exp, dict) and isinstance(exp.get("features"), list):
            exp["features"] = [v for f in exp["features"] for v in variants_of.get(f, [f])]
    return config


def sweep_variants(name: str, entry: dict, sweep) -> dict[str, dict]:
    """One extractor entry per combination of the swept values (a setting path absent from the
    entry is created; the schema then checks it like any written setting)."""
    import itertools

    if not isinstance(sweep, dict) or not sweep or not all(isinstance(v, list) and v for v in sweep.values()):
        raise ConfigError(f"invalid configuration:\n  - 'features.{name}.sweep' must map setting paths "
                          f"(for example embed.t_fg) to non-empty lists of values, got {sweep!r}")
    for path in sweep:
        if path.split(".")[0] in ("kind", "sweep", "sweep_of", "aggregations"):
            raise ConfigError(f"invalid configuration:\n  - 'features.{name}.sweep' cannot sweep {path!r}; "
                              f"sweep a setting of the extractor or of its aggregation")
    variants = {}
    for values in itertools.product(*sweep.values()):
        variant = copy.deepcopy(entry)
        for path, value in zip(sweep, values):
            *parents, leaf = path.split(".")
            block = variant
            for key in parents:
                block = block.setdefault(key, {})
                if not isinstance(block, dict):
                    raise ConfigError(f"invalid configuration:\n  - 'features.{name}.sweep': {path!r} goes "
                                      f"through {key!r}, which is not a block of settings")
            block[leaf] = value
        suffix = "".join(f".{path.rsplit('.', 1)[-1]}-{_name_part(v)}" for path, v in zip(sweep, values))
        variant["sweep_of"] = {"extractor": name,
                               "setting": ", ".join(f"{p}={v if isinstance(v, str) else json.dumps(v)}"
                                                   for p, v in zip(sweep, values))}
        variants[name + suffix] = variant
    return variants


def _name_part(value) -> str:
    import re

    text = json.dumps(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "_"


def _key_sorted(obj):
    """Same content, keys in sorted order: Snakemake compares params by their text, so the key
    order of a YAML file must not look like a change of settings."""
    if isinstance(obj, dict):
        return {k: _key_sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [_key_sorted(v) for v in obj]
    return obj


def settings_hash(*parts: Any) -> str:
    """Short stable hash of JSON-serialisable settings (key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def binarize_settings(preprocess: dict, method: str) -> dict:
    """The effective settings of one binarizer: only the keys that change its output."""
    if method == "otsu":
        return {"method": "otsu"}
    if method == "sauvola":
        return {"method": "sauvola", "window": preprocess["window"], "k": preprocess["k"]}
    if method in ("sam", "sam+otsu", "sam+sauvola"):
        inner = "sauvola" if method == "sam+sauvola" else "otsu"
        return {"method": method, "binarizer": binarize_settings(preprocess, inner)}
    raise ConfigError(f"unknown binarization method {method!r}; allowed: otsu, sauvola, sam, sam+otsu, sam+sauvola")


def uses_sam(config: dict) -> bool:
    pre = config["preprocess"]
    return any(m.startswith("sam") for m in [pre["method"], *pre["compare"]])


def dataset_hash(config: dict, dataset: str) -> str:
    return settings_hash("dataset", config["datasets"][dataset])


def _imported_modules(tree: ast.AST, package: str, current: str) -> set[str]:
    """Dotted names of the workflow package's modules a parsed file imports (anywhere in it)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = current.split(".")[: len(current.split(".")) - node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == package:
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


# Modules that route settings, log and record provenance, and never change what a stage computes:
# the settings they hand on are hashed into the folder names, so they stay out of code versions.
PLUMBING = frozenset({"writer_retrieval.config", "writer_retrieval.plan", "writer_retrieval.jobs",
                      "writer_retrieval.provenance", "writer_retrieval.logs"})
# The pretraining methods' own modules: a run's code version covers only the method it trains.
# none (a checkpoint used as it is) builds a ViT or, for SAGHOG, the encoder of saghog.py.
PRETRAIN_MODULES = {"attmask": "attmask", "flip": "pretext", "rotation": "pretext", "jigsaw": "pretext",
                    "sorting": "pretext", "saghog": "saghog", "none": "saghog"}


def code_version(script: str, workflow_dir, skip: frozenset = frozenset()) -> str:
    """Version of a stage's code: a hash of scripts/<script>.py and every module of the package it
    imports, directly or through other modules (comments and formatting do not count: the hash
    is over the parsed syntax tree), but the plumbing and the modules in `skip`. A stage rule
    passes it as a param, so editing a library module re-runs exactly the stages whose code
    depends on it, and what follows them."""
    return settings_hash("code", sorted(_code_trees(script, workflow_dir, skip).items()))


def pretrain_code_skip(method: str) -> frozenset:
    """The other methods' modules, which a `method` pretraining run imports but never runs."""
    own = PRETRAIN_MODULES[method]
    return frozenset(f"writer_retrieval.pretrain.{m}" for m in set(PRETRAIN_MODULES.values()) - {own})


def _code_trees(script: str, workflow_dir, skip: frozenset = frozenset()) -> dict[str, str]:
    from pathlib import Path

    root = Path(workflow_dir).resolve()  # the same names (so the same hash) however the folder is spelled
    package_dir = Path(__file__).resolve().parent
    package = package_dir.name
    files = {}
    todo = [(root / "scripts" / f"{script}.py", "__main__")]
    seen = set()
    while todo:
        path, name = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        files[str(path.relative_to(root) if path.is_relative_to(root) else path.relative_to(package_dir.parent))] = \
            ast.dump(tree, annotate_fields=False)
        # Relative imports resolve against the module's package (an __init__ is inside its own).
        for module in _imported_modules(tree, package, f"{name}.__init__" if path.name == "__init__.py" else name):
            if module in PLUMBING or module in skip:
                continue
            rel = module.split(".")[1:]
            candidates = [package_dir.joinpath(*rel).with_suffix(".py"), package_dir.joinpath(*rel, "__init__.py")]
            for candidate in candidates:
                if rel and candidate.is_file():
                    todo.append((candidate, module))
                    break
            else:
                if not rel:
                    todo.append((package_dir / "__init__.py", package))
    return files


def code_files(script: str, workflow_dir, skip: frozenset = frozenset()) -> list[str]:
    """The files code_version(script, skip=skip) covers (for logs and tests)."""
    return sorted(_code_trees(script, workflow_dir, skip))
