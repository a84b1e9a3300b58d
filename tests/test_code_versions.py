"""The files each stage's code version covers (config.code_files): editing one of them re-runs the
stage, editing any other file does not. The sets are written out so that a new import, which
widens what re-runs a stage, shows up here as a failure to look at, not as silent re-runs."""
import subprocess
import sys
from pathlib import Path

import pytest

from writer_retrieval.config import code_files, pretrain_code_skip

REPO = Path(__file__).resolve().parents[1]

# stage -> the package files (relative to src/writer_retrieval) besides scripts/<stage>.py. The
# plumbing (config, plan, jobs, provenance, logs) routes settings and is never covered.
BASE = {"errors.py", "imaging.py", "storage.py"}
COVERED = {
    "dataset": BASE | {"dataset.py", "synthetic.py"},
    "segment": BASE | {"segment.py", "binarize.py", "devices.py"},
    "binarize": BASE | {"__init__.py", "binarize.py"},
    "features": BASE | {"__init__.py", "binarize.py", "features.py"},
    "patches": BASE | {"__init__.py", "binarize.py", "features.py", "patches.py"},
    "cluster": BASE | {"__init__.py", "binarize.py", "cluster.py", "features.py", "vlad.py", "normalise.py"},
    "pretrain": BASE | {"devices.py", "pretrain/__init__.py", "pretrain/attmask.py", "pretrain/augment.py",
                        "pretrain/pretext.py", "pretrain/saghog.py", "pretrain/loop.py", "vit.py"},
    # fine-tuning picks its epoch by validation mAP, so it (and the patch embedding that imports it) covers
    # the leave-one-out scoring (metrics.py), not the retrieval stage
    "finetune": BASE | {"devices.py", "finetune.py", "pretrain/saghog.py", "pretrain/loop.py", "vit.py",
                        "metrics.py", "normalise.py", "vlad.py"},
    "embed": BASE | {"embed.py", "vit.py", "devices.py", "binarize.py"},
    "embed_patches": BASE | {"embed_patches.py", "finetune.py", "pretrain/saghog.py", "pretrain/loop.py", "vit.py",
                             "devices.py", "normalise.py", "binarize.py", "metrics.py", "vlad.py"},
    "vlad": BASE | {"__init__.py", "binarize.py", "vlad.py", "features.py", "normalise.py"},
    "pca": {"errors.py", "storage.py", "pca.py", "normalise.py"},
    "rerank": {"errors.py", "storage.py", "rerank.py", "lowrank.py", "pca.py", "normalise.py"},
    "esvm": {"__init__.py", "errors.py", "storage.py", "esvm.py", "pca.py", "normalise.py"},
    "retrieval": {"errors.py", "storage.py", "retrieval.py", "metrics.py", "bootstrap.py", "lowrank.py", "pca.py",
                  "normalise.py"},
    "report": BASE | {"report.py", "training_health.py", "bootstrap.py"},
}
PLUMBING = {"config.py", "plan.py", "jobs.py", "provenance.py", "logs.py"}

# Files a stage must never cover, whatever else it imports: why each split exists.
NEVER = {
    "embed": {"pretrain/__init__.py", "pretrain/attmask.py", "pretrain/pretext.py", "pretrain/saghog.py",
              "pretrain/loop.py", "finetune.py", "embed_patches.py"},
    "embed_patches": {"embed.py", "pretrain/__init__.py", "pretrain/attmask.py", "pretrain/pretext.py"},
    "finetune": {"pretrain/__init__.py", "pretrain/attmask.py", "pretrain/pretext.py", "retrieval.py", "bootstrap.py"},
    "retrieval": {"rerank.py"},
    "pca": {"vlad.py"},
}


def covered(stage: str) -> set[str]:
    files = code_files(stage, REPO)
    assert f"scripts/{stage}.py" in files
    return {f.removeprefix("src/").removeprefix("writer_retrieval/") for f in files if f != f"scripts/{stage}.py"}


def test_every_stage_script_is_listed():
    assert set(COVERED) == {p.stem for p in (REPO / "scripts").glob("*.py")}


@pytest.mark.parametrize("stage", sorted(COVERED))
def test_stage_covers_exactly_its_modules(stage):
    got = covered(stage)
    assert got == COVERED[stage], f"{stage}: newly covered {sorted(got - COVERED[stage])}, " \
                                  f"no longer covered {sorted(COVERED[stage] - got)}"


@pytest.mark.parametrize("stage", sorted(NEVER))
def test_stage_does_not_cover_other_stages_code(stage):
    assert not covered(stage) & NEVER[stage]


def test_no_stage_covers_the_plumbing():
    assert not any(covered(stage) & PLUMBING for stage in COVERED)


@pytest.mark.parametrize("method, own, others", [
    ("attmask", "attmask.py", {"pretext.py", "saghog.py"}),
    ("jigsaw", "pretext.py", {"attmask.py", "saghog.py"}),
    ("saghog", "saghog.py", {"attmask.py", "pretext.py"}),
])
def test_a_pretraining_run_covers_its_own_method_only(method, own, others):
    files = {f.rsplit("/", 1)[-1] for f in code_files("pretrain", REPO, pretrain_code_skip(method))}
    assert own in files and "loop.py" in files and not files & others


def test_runtime_imports_match_the_walk():
    """At run time too, the ViT embedding loads nothing of the pretrain package and the patch
    embedding no other training method (Python runs pretrain/__init__.py before any submodule)."""
    check = ("import sys\n"
             "def loaded(): return ','.join(m for m in sys.modules if m.startswith('writer_retrieval.pretrain'))\n"
             "import writer_retrieval.embed; print(loaded())\n"
             "import writer_retrieval.embed_patches, writer_retrieval.finetune; print(loaded())\n")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, cwd=REPO).stdout
    after_embed, after_patches = (set(filter(None, line.split(","))) for line in out.splitlines())
    assert after_embed == set()
    assert after_patches == {"writer_retrieval.pretrain", "writer_retrieval.pretrain.loop",
                             "writer_retrieval.pretrain.saghog"}
