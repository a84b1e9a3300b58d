"""docs/configuration.md is the generator's current output, the generator's entries say the right
things, and every relative link of the README and the docs resolves."""
import re
from pathlib import Path

import pytest

from writer_retrieval.config import load_schema
from writer_retrieval.config_reference import main, reference, walk_schema

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = ".venv/bin/python -m writer_retrieval.config_reference --output docs/configuration.md"


@pytest.fixture(scope="module")
def text():
    return reference()


def entry(text: str, path: str) -> str:
    """The Markdown of one key path's entry, up to the next heading."""
    match = re.search(rf"^#+ `?{re.escape(path)}`?\n\n(.*?)(?=^#|\Z)", text, re.M | re.S)
    assert match, f"no entry for {path}"
    return match.group(1)


def test_docs_configuration_md_is_the_generators_current_output(text):
    assert (ROOT / "docs" / "configuration.md").read_text() == text, \
        f"docs/configuration.md is stale: regenerate it with `{REGENERATE}`"


def test_the_command_line_writes_the_same_reference(text, tmp_path):
    assert main(["--output", str(tmp_path / "configuration.md")]) == 0
    assert (tmp_path / "configuration.md").read_text() == text


def test_a_known_key_has_its_type_default_and_description(text):
    pca_dims = entry(text, "aggregation.pca_dims")
    assert pca_dims.startswith("integer, >= 1 · default `384`\n\nPrincipal components modelled")


def test_an_enum_lists_its_allowed_values(text):
    assert entry(text, "aggregation.pca").startswith("one of `none`, `whiten`, `shrink`, `power` · default `shrink`")
    encoding = entry(text, "experiments[].encoding")
    assert encoding.startswith("list of values from `none`, `esvm`, non-empty · default `[\"none\"]`")


def test_execution_settings_are_marked_and_result_settings_are_not(text):
    assert "**execution setting** (not hashed: changing it re-runs nothing)" in entry(text, "aggregation.chunk_size")
    assert "execution setting" not in entry(text, "aggregation.codebook_size")


def test_branches_name_the_kind_method_or_adapter_they_belong_to(text):
    epochs = entry(text, "features.<name>.pretrain.epochs")
    assert ("**When `kind: vit`, `method: attmask | flip | rotation | jigsaw | sorting`:** integer, >= 1 · "
            "default `100`") in epochs
    assert "**When `kind: saghog`:** integer, >= 1 · default `200`" in epochs
    root = entry(text, "datasets.<name>.root")
    assert root.startswith("**When `adapter: icdar2017 | icdar2019 | cvl | hisfrag20 | folder | words`:** "
                           "string, non-empty · **required**")
    # A key of every adapter names none; the adapter key lists what each adapter reads.
    assert entry(text, "datasets.<name>.empty_page_ink").startswith("number, >= 0, <= 1 · default `0.0005`")
    assert "- `icdar2017`: ICDAR2017 Historical-WI: {writer}-IMG_MAX_{id}.jpg" in entry(text, "datasets.<name>.adapter")


def test_a_shared_definition_is_listed_once_and_referred_to(text):
    assert "Same keys as `aggregation` (listed there)." in entry(text, "features.<name>.aggregation")
    assert "### `features.<name>.aggregation.pca`" not in text
    assert "### `aggregation.pca`" in text


def test_every_key_of_the_schema_has_a_description():
    undescribed = [e.path for e in walk_schema(load_schema()).entries.values() if not e.description]
    assert undescribed == [], "add a description to these keys in src/writer_retrieval/config.schema.yaml"


# Relative links of the documentation: [text](target) and ![alt](target), outside code.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
DOCUMENTS = [ROOT / "README.md", ROOT / "configs" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def without_code(markdown: str) -> str:
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", markdown, flags=re.S))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (and explicit <a id>)."""
    markdown = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    found, seen = set(re.findall(r'<a id="([^"]+)">', markdown)), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_every_relative_link_of_the_readme_and_docs_resolves():
    assert len(DOCUMENTS) > 5  # the README, configs/README.md and the docs/*.md pages
    broken = []
    for doc in DOCUMENTS:
        for target in LINK.findall(without_code(doc.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto: are not this repository's
                continue
            name, _, anchor = target.partition("#")
            path = (doc.parent / name).resolve() if name else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []
