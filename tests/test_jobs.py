"""Job plumbing: recording settings reads, merged settings, resumable training folders, provenance."""
import json

import pytest

from writer_retrieval.jobs import RecordingDict, merged, resumable_run
from writer_retrieval.provenance import merge_runs, path_columns, run_facts


def test_recording_dict_notes_dotted_paths_of_what_is_read():
    reads = set()
    settings = RecordingDict({"power": 0.5, "model": {"depth": 2, "heads": 3}, "unused": 1}, reads.add)
    assert settings["power"] == 0.5 and settings["model"]["depth"] == 2 and settings.get("missing") is None
    assert reads == {"power", "model", "model.depth"}
    copy = {**settings}  # a copy hands every key on, so every key counts as read
    assert copy == {"power": 0.5, "model": {"depth": 2, "heads": 3}, "unused": 1}
    assert "unused" in reads and "model.heads" not in reads


def test_merged_settings_keep_result_and_add_execution_blocks():
    assert merged({"embed": {"t_fg": 10}, "seed": 0}, {"embed": {"batch_size": 4}, "device": "cpu"}) == \
        {"embed": {"t_fg": 10, "batch_size": 4}, "seed": 0, "device": "cpu"}


def test_resumable_run_moves_the_finished_files_and_keeps_a_failed_run(tmp_path):
    outputs = [tmp_path / "backbone.pt", tmp_path / "checkpoint.pt"]
    with pytest.raises(RuntimeError):
        with resumable_run(tmp_path, outputs) as scratch:
            (scratch / "checkpoint.pt").write_text("epoch 1")
            raise RuntimeError("killed")
    assert (tmp_path / "resume" / "checkpoint.pt").read_text() == "epoch 1"  # kept for the next attempt
    with resumable_run(tmp_path, outputs) as scratch:
        assert (scratch / "checkpoint.pt").read_text() == "epoch 1"
        (scratch / "backbone.pt").write_text("weights")
    assert [p.read_text() for p in outputs] == ["weights", "epoch 1"]
    assert not (tmp_path / "resume").exists()


def test_provenance_sums_seconds_per_stage_and_names_the_devices(tmp_path):
    cpu = run_facts(None, 2, 1.5)
    assert cpu["device"] == "cpu" and cpu["gpu"] is None and cpu["versions"]["numpy"]
    stage = merge_runs([cpu, {**cpu, "seconds": 2.5}])
    assert stage["seconds"] == 4.0 and stage["jobs"] == 2 and stage["device"] == "cpu"
    records = []
    for name, run in [("features", stage), ("descriptors", {**cpu, "seconds": 0.25}),
                      ("embed", {**cpu, "device": "cuda:0", "gpu": "NVIDIA H200"})]:
        records.append(tmp_path / f"{name}.json")
        records[-1].write_text(json.dumps({"stage": name, "run": run}))
    columns = path_columns(records, ["features", "embed", "descriptors", "pretrain"])
    assert columns["seconds_features"] == 4.0 and columns["seconds_descriptors"] == 0.25
    assert columns["seconds_pretrain"] != columns["seconds_pretrain"]  # NaN: not on the path
    assert columns["device"] == "cuda:0 (NVIDIA H200)"


def test_scripts_take_settings_only_from_their_variant():
    """A stage reads only what its variant hashes (result) or marks as execution: no script looks at
    the config or at the params' settings copy itself (the dataset stage has no variant folder)."""
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    for script in scripts.glob("*.py"):
        text = script.read_text()
        assert ".config" not in text, script.name
        if script.name not in ("dataset.py", "report.py"):
            assert "params.settings" not in text and "stage_job(" in text, script.name
