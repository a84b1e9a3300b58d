"""The configuration reference (docs/configuration.md), generated from the schema's descriptions.

    python -m writer_retrieval.config_reference > docs/configuration.md
    python -m writer_retrieval.config_reference --output docs/configuration.md

The walk follows properties, `$ref`s, named entries (`additionalProperties`, shown as `<name>`),
list items (`[]`) and the if/then branches (adapters, extractor kinds, pretraining methods,
rerankers). Every key path gets one entry per distinct definition, with the branches it applies
to; an object definition reached from several paths (the extractors' own `aggregation`) is listed
once, where its path is shortest, and referred to elsewhere.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import load_schema

PLACEHOLDER = "<name>"
EXECUTION = "**execution setting** (not hashed: changing it re-runs nothing)"
HEADER = """# Configuration reference

<!-- Generated from src/writer_retrieval/config.schema.yaml by
     `.venv/bin/python -m writer_retrieval.config_reference --output docs/configuration.md`;
     edit the schema's descriptions, not this file. -->

Every key of a workflow configuration (`config.yaml`, `configs/*.yaml`, `--config` overrides),
generated from the schema the Snakefile validates against. `<name>` stands for a name you choose
(a dataset, feature extractor or reranker); `[]` for each item of a list. *When* says which
adapter, extractor kind or method a key belongs to. Presets: [configs/README.md](../configs/README.md).
"""

Condition = tuple[str, tuple[str, ...]]  # (key, values) of one if/then branch


@dataclass
class Entry:
    """One definition of a key path; definitions with equal facts and description merge."""
    path: str
    facts: str  # type or allowed values, default, required, execution mark
    description: str
    when: list[tuple[Condition, ...]] = field(default_factory=list)  # the branches it applies to

    @property
    def body(self) -> str:
        return "\n\n".join(part for part in (self.facts, self.description) if part)


def _inline(value) -> str:
    """A value as written in YAML: strings bare, the rest as JSON (which YAML reads too)."""
    return f"`{value}`" if isinstance(value, str) and value else f"`{json.dumps(value, ensure_ascii=False)}`"


def _bounds(node: dict) -> list[str]:
    signs = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    parts = [f"{sign} {node[k]}" for k, sign in signs.items() if k in node]
    if "minItems" in node or "maxItems" in node:
        low, high = node.get("minItems", 0), node.get("maxItems")
        parts.append(f"{low} items" if low == high else f"{low} to {high} items" if high
                     else "non-empty" if low == 1 else f"at least {low} items")
    if node.get("minLength") or node.get("minProperties"):  # both are 1 wherever the schema sets them
        parts.append("non-empty")
    return parts


def _values(values: list) -> str:
    return ", ".join(_inline(v) for v in values)


def _type_text(node: dict) -> str:
    """What a value may be: type or allowed values, and its bounds."""
    items = node.get("items") if isinstance(node.get("items"), dict) else {}
    if "enum" in node:
        text = "one of " + _values(node["enum"])
    elif "properties" in items:
        text = "list of objects"
    elif "enum" in items:
        text = "list of values from " + _values(items["enum"])
    elif items:
        text = _type_text(items)
        text = f"list of {text}s" if text.isalpha() else f"list of {text}"
    else:
        kinds = node.get("type", "object" if "properties" in node else "any")
        text = " or ".join(kinds) if isinstance(kinds, list) else kinds
    names = node.get("propertyNames", {})
    if "pattern" in names:
        text += f", names matching `{names['pattern']}`"
    if "const" in names.get("not", {}):
        text += f", not {_inline(names['not']['const'])}"
    return ", ".join([text, *_bounds(node)])


def _facts_and_description(node: dict, required: str, same_as: str | None, notes: list[str]) -> tuple[str, str]:
    facts = [_type_text(node)]
    if "default" in node:
        facts.append(f"default {_inline(node['default'])}")
    if required:
        facts.append(required)
    if node.get("x-execution"):
        facts.append(EXECUTION)
    description = node.get("description", "").strip()
    if same_as:
        description += f" Same keys as `{same_as}` (listed there)."
    return " · ".join(facts), "\n\n".join(part for part in (description, "\n".join(notes)) if part)


def _conditions(if_node: dict) -> tuple[Condition, ...]:
    out = []
    for key, test in if_node.get("properties", {}).items():
        values = [test["const"]] if "const" in test else test.get("enum", [])
        out.append((key, tuple(str(v) for v in values)))
    return tuple(out)


def _expandable(node: dict) -> bool:
    return bool(node.get("properties") or node.get("allOf"))


def _required_text(name: str, node: dict) -> str:
    alternatives = [r for alt in node.get("oneOf", []) for r in alt.get("required", [])]
    if name in alternatives:
        return "required: exactly one of " + ", ".join(f"`{a}`" for a in alternatives)
    return "**required**" if name in node.get("required", []) else ""


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i + 1]) for i in range(len(parts))]


def _section(path: str) -> str:
    return path.split(".")[0].removesuffix("[]")


class Walker:
    """One depth-first walk of the schema: the entries, and where each object definition is referenced."""

    def __init__(self, schema: dict, homes: dict[str, str] | None = None):
        self.defs = schema.get("$defs", {})
        self.homes = homes or {}
        self.sites: dict[str, list[str]] = {}  # object definition -> the key paths that reference it
        self.entries: dict[tuple[str, str, str], Entry] = {}
        self.first_seen: dict[str, int] = {}  # path -> order of first appearance (keeps the tree order)
        self.choices: dict[tuple, list[str]] = {}  # (conditions above, key) -> the values its branches cover

    def resolve(self, node: dict) -> tuple[dict, str | None]:
        """The node with its $ref target merged in (the referring node's own keys win), and the target's name."""
        if "$ref" not in node:
            return node, None
        name = node["$ref"].rsplit("/", 1)[-1]
        target, _ = self.resolve(self.defs[name])
        return {**target, **{k: v for k, v in node.items() if k != "$ref"}}, name

    def children(self, path: str, node: dict, when: tuple[Condition, ...], restated: tuple[str, ...] = ()) -> None:
        """Entries of a node's keys; `restated`: the discriminators of the branch the node is, whose
        entry is its parent's."""
        notes = self._branch_notes(node)
        for name, sub in node.get("properties", {}).items():
            if name not in restated:
                self.key(_join(path, name), sub, _required_text(name, node), when, notes.get(name, []))
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and _expandable(self.resolve(extra)[0]):
            self.children(_join(path, PLACEHOLDER), self.resolve(extra)[0], when)
        items = node.get("items")
        if isinstance(items, dict) and _expandable(items):
            self.children(f"{path}[]", items, when)
        for branch in node.get("allOf", []):
            if "if" in branch:
                tests = _conditions(branch["if"])
                for key, values in tests:
                    self.choices.setdefault((when, key), []).extend(values)
                self.children(path, self.resolve(branch["then"])[0], when + tests, tuple(k for k, _ in tests))

    def key(self, path: str, node: dict, required: str, when: tuple[Condition, ...], notes: list[str]) -> None:
        node, ref = self.resolve(node)
        shared = ref if ref and _expandable(node) else None
        if shared and path not in self.sites.setdefault(shared, []):
            self.sites[shared].append(path)
        # A shared definition is listed under its home path only; elsewhere its entry refers there.
        same_as = self.homes.get(shared) if shared and self.homes.get(shared) != path else None
        self.add(path, *_facts_and_description(node, required, same_as, notes), when)
        if not same_as:
            self.children(path, node, when)

    def _branch_notes(self, node: dict) -> dict[str, list[str]]:
        """Discriminator key -> one line per described branch ('- `icdar2017`: ICDAR2017 Historical-WI ...')."""
        notes: dict[str, list[str]] = {}
        for branch in node.get("allOf", []):
            then = self.resolve(branch.get("then", {}))[0]
            if "if" not in branch or not then.get("description"):
                continue
            for key, values in _conditions(branch["if"]):
                names = " | ".join(f"`{v}`" for v in values)
                notes.setdefault(key, []).append(f"- {names}: {then['description'].strip()}")
        return notes

    def add(self, path: str, facts: str, description: str, when: tuple[Condition, ...]) -> None:
        for prefix in _prefixes(path):
            self.first_seen.setdefault(prefix, len(self.first_seen))
        entry = self.entries.setdefault((path, facts, description), Entry(path, facts, description))
        if when not in entry.when:
            entry.when.append(when)


def _simplify(alternatives: list[tuple[Condition, ...]], choices: dict) -> list[tuple[Condition, ...]]:
    """Join alternatives that differ only in their last value; one that covers every branch of its
    key drops that condition (a key of every adapter needs no adapter named)."""
    alternatives, collapsed = list(alternatives), True
    while collapsed and all(alternatives):
        collapsed, groups = False, {}
        for alt in alternatives:
            values = groups.setdefault((alt[:-1], alt[-1][0]), [])
            values += [v for v in alt[-1][1] if v not in values]
        alternatives = []
        for (prefix, key), values in groups.items():
            full = set(values) == set(choices.get((prefix, key), ()))
            collapsed |= full
            alt = prefix if full else (*prefix, (key, tuple(values)))
            if alt not in alternatives:
                alternatives.append(alt)
    return alternatives


def _when_text(alternatives: list[tuple[Condition, ...]], choices: dict) -> str:
    """The branches an entry applies to ('' when it applies everywhere)."""
    alternatives = _simplify(alternatives, choices)
    if not all(alternatives):
        return ""
    return "; or ".join(", ".join(f"`{key}: {' | '.join(values)}`" for key, values in alt) for alt in alternatives)


def _variants(entries: list[Entry], choices: dict) -> list[str]:
    lines = []
    for entry in entries:
        when = _when_text(entry.when, choices)
        lines += [f"**When {when}:** {entry.body}" if when else entry.body, ""]
    return lines


def walk_schema(schema: dict) -> Walker:
    """Two walks: the first finds where each object definition is referenced, the second lists it
    where its path is shortest and refers to it elsewhere."""
    first = Walker(schema)
    first.children("", schema, ())
    homes = {name: min(paths, key=lambda p: p.count(".")) for name, paths in first.sites.items()}
    walker = Walker(schema, homes)
    walker.children("", schema, ())
    return walker


def reference(schema: dict | None = None) -> str:
    """docs/configuration.md: one section per top-level key, one entry per key path below it."""
    schema = schema or load_schema()
    walker = walk_schema(schema)
    by_path: dict[str, list[Entry]] = {}
    for entry in walker.entries.values():
        by_path.setdefault(entry.path, []).append(entry)
    sections = [p for p in by_path if _section(p) == p]
    lines = [HEADER, schema.get("description", "").strip(), "",
             "Sections: " + ", ".join(f"[`{s}`](#{s})" for s in sections) + ".", ""]
    for section in sections:
        lines += [f"## {section}", "", *_variants(by_path[section], walker.choices)]
        below = [p for p in by_path if _section(p) == section and p != section]
        for path in sorted(below, key=lambda p: [walker.first_seen[q] for q in _prefixes(p)]):
            lines += [f"### `{path}`", "", *_variants(by_path[path], walker.choices)]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the configuration reference (Markdown) from the schema.")
    parser.add_argument("--output", type=Path, help="file to write (default: standard output)")
    args = parser.parse_args(argv)
    text = reference()
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
