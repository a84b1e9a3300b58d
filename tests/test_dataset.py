import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from writer_retrieval.config import validate_config
from writer_retrieval.dataset import DatasetError, _ruled_rows, assign_splits, build_index, source_manifest

from pages import handwriting_like


def settings_for(adapter, root, **extra):
    cfg = validate_config({"datasets": {"d": {"adapter": adapter, "root": str(root), **extra}},
                           "experiments": [{"dataset": "d"}]})
    return cfg["datasets"]["d"]


def run(tmp_path, settings, on_bad_input="stop"):
    out = tmp_path / "out"
    index = build_index("d", settings, out / "index.parquet", out / "rejected.parquet", out / "generated",
                        on_bad_input=on_bad_input)
    rejected = pd.read_parquet(out / "rejected.parquet")
    assert pd.read_parquet(out / "index.parquet").equals(index)
    return index, rejected


def test_icdar2017_names_splits_and_sizes(tmp_path, write_page):
    root = tmp_path / "icdar17"
    for split, writers in (("train", ["1", "2"]), ("test", ["3", "4"])):
        for w in writers:
            for i in range(2):
                write_page(root / split / f"{w}-IMG_MAX_{int(w) * 100 + i}.jpg", seed=int(w) * 10 + i)
    index, rejected = run(tmp_path, settings_for("icdar2017", root, splits={"train": "train", "test": "test"}))
    assert len(index) == 8 and rejected.empty
    assert list(index.columns[:7]) == ["doc_id", "path", "writer", "page", "split", "width", "height"]
    assert set(index.loc[index.split == "train", "writer"]) == {"1", "2"}
    assert set(index.loc[index.split == "test", "writer"]) == {"3", "4"}
    row = index.set_index("doc_id").loc["3-IMG_MAX_300"]
    assert (row.width, row.height, row.page) == (160, 120, "3-IMG_MAX_300")


def test_unknown_name_and_truncated_jpeg_stop_the_run_naming_the_files(tmp_path, write_page):
    root = tmp_path / "icdar17"
    write_page(root / "1-IMG_MAX_1.jpg", seed=1)
    write_page(root / "2-IMG_MAX_2.jpg", seed=2)
    write_page(root / "scan_0007.jpg", seed=3)
    good = write_page(root / "3-IMG_MAX_3.jpg", seed=4)
    good.write_bytes(good.read_bytes()[:-300])
    with pytest.raises(DatasetError) as err:
        run(tmp_path, settings_for("icdar2017", root))
    msg = str(err.value)
    assert "2 input file(s) rejected" in msg
    assert "scan_0007.jpg: name does not match" in msg
    assert "3-IMG_MAX_3.jpg: truncated" in msg
    assert "on_bad_input: skip" in msg
    assert not (tmp_path / "out" / "index.parquet").exists()


def test_skip_records_every_rejected_file(tmp_path, write_page):
    root = tmp_path / "icdar17"
    write_page(root / "1-IMG_MAX_1.png", seed=1)
    write_page(root / "2-IMG_MAX_2.png", seed=2)
    (root / "3-IMG_MAX_3.png").write_bytes(b"")
    (root / "notes.doc").write_text("not an image")
    (root / "README.md").write_text("ignored by the default 'ignore' patterns")
    Image.fromarray(np.full((50, 60), 240, np.uint8)).save(root / "4-IMG_MAX_4.png")  # blank page
    index, rejected = run(tmp_path, settings_for("icdar2017", root), on_bad_input="skip")
    assert sorted(index.doc_id) == ["1-IMG_MAX_1", "2-IMG_MAX_2"]
    reasons = dict(zip(rejected.path.map(lambda p: p.rsplit("/", 1)[-1]), rejected.reason))
    assert reasons["3-IMG_MAX_3.png"] == "zero bytes"
    assert reasons["notes.doc"].startswith("not an image file")
    assert reasons["4-IMG_MAX_4.png"].startswith("empty page")
    assert "README.md" not in reasons and len(reasons) == 3


def test_icdar2019_labels_csv(tmp_path, write_page):
    root = tmp_path / "hisir19"
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "stray.jpg"]):
        write_page(root / "imgs" / name, seed=i)
    pd.DataFrame({"FILENAME": ["a.jpg", "b.jpg", "c.jpg", "missing.jpg"], "ID": [7, 7, 9, 9]}).to_csv(
        root / "labels.csv", index=False)
    index, rejected = run(tmp_path, settings_for("icdar2019", root, labels="labels.csv"), on_bad_input="skip")
    assert dict(zip(index.doc_id, index.writer)) == {"a": "7", "b": "7", "c": "9"}
    reasons = dict(zip(rejected.path.map(lambda p: p.rsplit("/", 1)[-1]), rejected.reason))
    assert reasons == {"stray.jpg": "not listed in labels.csv", "missing.jpg": "listed in labels.csv but no such file"}


def test_icdar2019_missing_column_is_a_clear_error(tmp_path, write_page):
    root = tmp_path / "hisir19"
    write_page(root / "a.jpg")
    pd.DataFrame({"FILE": ["a.jpg"], "ID": [1]}).to_csv(root / "labels.csv", index=False)
    with pytest.raises(DatasetError, match=r"labels.csv: labels CSV lacks column\(s\) FILENAME"):
        run(tmp_path, settings_for("icdar2019", root, labels="labels.csv"))


def test_cvl_pages_cropped_duplicates_and_blank_page(tmp_path, write_page):
    root = tmp_path / "cvl"
    write_page(root / "train" / "0001-1.tif", seed=1)
    write_page(root / "train" / "0001-1-cropped.tif", seed=2)
    write_page(root / "train" / "0001-2.tif", seed=3)
    write_page(root / "test" / "0052-1-cropped.tif", seed=4)
    write_page(root / "test" / "0052-3-cropped.tif", seed=5)
    Image.fromarray(np.full((80, 80), 250, np.uint8)).save(root / "test" / "0052-4.tif")
    index, rejected = run(tmp_path, settings_for("cvl", root, splits={"train": "train", "test": "test"}),
                          on_bad_input="skip")
    assert sorted(index.doc_id) == ["0001-1-cropped", "0001-2", "0052-1-cropped", "0052-3-cropped"]
    assert set(index.page) == {"0001-1", "0001-2", "0052-1", "0052-3"}
    reasons = dict(zip(rejected.path.map(lambda p: p.rsplit("/", 1)[-1]), rejected.reason))
    assert reasons["0001-1.tif"].startswith("duplicate of CVL page 0001-1")
    assert reasons["0052-4.tif"].startswith("empty page")


def test_hisfrag20_fragments_keep_their_source_page(tmp_path, write_page):
    root = tmp_path / "hisfrag"
    for i, name in enumerate(["12_3_1.jpg", "12_3_2.jpg", "12_4_1.jpg", "40_1_1.jpg"]):
        write_page(root / name, seed=i)
    index, rejected = run(tmp_path, settings_for("hisfrag20", root, train_writer_fraction=0.0))
    assert dict(zip(index.doc_id, index.page)) == {"12_3_1": "12_3", "12_3_2": "12_3", "12_4_1": "12_4",
                                                   "40_1_1": "40_1"}
    assert set(index.split) == {"test"}


def test_folder_with_labels_csv_and_with_regex(tmp_path, write_page):
    root = tmp_path / "any"
    write_page(root / "x" / "p1.png", seed=1)
    write_page(root / "x" / "p2.png", seed=2)
    write_page(root / "y" / "p1.png", seed=3)
    pd.DataFrame({"path": ["x/p1.png", "x/p2.png", "y/p1.png"], "writer": ["ann", "ann", "bob"],
                  "split": ["train", "test", "test"]}).to_csv(root / "labels.csv", index=False)
    index, _ = run(tmp_path, settings_for("folder", root, labels="labels.csv"))
    assert dict(zip(index.doc_id, zip(index.writer, index.split))) == {
        "x__p1": ("ann", "train"), "x__p2": ("ann", "test"), "y__p1": ("bob", "test")}

    root2 = tmp_path / "regex"
    for i, name in enumerate(["w01_s1.png", "w01_s2.png", "w02_s1.png", "w02_s2.png", "junk.png"]):
        write_page(root2 / name, seed=i)
    settings = settings_for("folder", root2, pattern=r"w(?P<writer>\d+)_s(?P<page>\d+)\.png")
    with pytest.raises(DatasetError, match=r"junk.png: name does not match pattern"):
        run(tmp_path, settings)
    index, rejected = run(tmp_path, settings, on_bad_input="skip")
    assert len(index) == 4 and list(rejected.reason) == [r"name does not match pattern w(?P<writer>\d+)_s(?P<page>\d+)\.png"]
    # Writers are split whole: a writer's pages never straddle train and test.
    assert index.groupby("writer").split.nunique().max() == 1


def test_assign_splits_is_by_writer_deterministic_and_keeps_given_splits():
    writers = pd.Series([f"w{i}" for i in range(10) for _ in range(3)])
    given = pd.Series([None] * 30, dtype=object)
    given[0] = "test"
    a = assign_splits(writers, given, 0.5, seed=3)
    b = assign_splits(writers, given, 0.5, seed=3)
    assert a.equals(b) and a[0] == "test"
    free_writers = writers[given.isna()]
    per_writer = a[given.isna()].groupby(free_writers).agg(set)
    assert all(len(s) == 1 for s in per_writer)


def test_ruled_line_detector():
    word = np.full((40, 100), 255, np.uint8)
    word[10:25, 20:60] = 0  # writing
    assert _ruled_rows(word) == (0, 0)
    word[-2:, 3:97] = 20  # a ruled line along the bottom edge
    assert _ruled_rows(word) == (0, 2)
    word[12:14, :] = 0  # a long stroke in the middle is writing, not an edge rule
    assert _ruled_rows(word) == (0, 2)


def test_words_tile_into_deterministic_pages_of_different_words(tmp_path, write_page):
    root = tmp_path / "words"
    rows = []
    for w in ("u1", "u2"):
        for word in ("alpha", "beta", "gamma"):
            for rep in range(4):
                rel = f"img/{w}_{word}_{rep}.png"
                write_page(root / rel, seed=len(rows))  # distinct seeds: identical images are duplicates
                rows.append({"path": rel, "writer": w, "word": word})
    # One word image has a ruled line along its bottom edge.
    lined = np.asarray(Image.open(root / rows[0]["path"])).copy()
    lined[-1, :] = 10
    Image.fromarray(lined).save(root / rows[0]["path"])
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    settings = settings_for("words", root, labels="labels.csv", words_per_page=5, page_width=400,
                            train_writer_fraction=0.5)
    index, rejected = run(tmp_path, settings)
    assert rejected.empty
    layout = pd.read_parquet(tmp_path / "out" / "generated" / "pages.parquet")
    # Every word image is used exactly once; 12 per writer -> pages of 5, 5 and a spread remainder (2 < 3).
    assert sorted(layout.source_path) == sorted(str(root / r["path"]) for r in rows)
    assert sorted(layout.groupby("doc_id").size()) == [6, 6, 6, 6]
    # Round robin over words: each page holds all three words.
    assert (layout.groupby("doc_id").word.nunique() == 3).all()
    assert layout.loc[layout.source_path.str.endswith(rows[0]["path"]), "trimmed_bottom"].item() == 1
    assert set(index.writer) == {"u1", "u2"} and index.groupby("writer").split.nunique().max() == 1
    first = {p: (tmp_path / "out" / "generated" / "pages" / f"{p}.png").read_bytes() for p in index.doc_id}
    (tmp_path / "out").rename(tmp_path / "first")
    index2, _ = run(tmp_path, settings)
    assert index2.drop(columns="path").equals(index.drop(columns="path"))
    for p, blob in first.items():
        assert (tmp_path / "out" / "generated" / "pages" / f"{p}.png").read_bytes() == blob


def reasons_by_name(rejected):
    return dict(zip(rejected.path.map(lambda p: p.rsplit("/", 1)[-1]), rejected.reason))


def test_exif_rotated_page_is_indexed_with_its_upright_size(tmp_path, write_page):
    root = tmp_path / "icdar17"
    write_page(root / "1-IMG_MAX_1.jpg", seed=1)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored 160 x 120, shown rotated by 90 degrees
    write_page(root / "2-IMG_MAX_2.jpg", seed=2, exif=exif)
    index, _ = run(tmp_path, settings_for("icdar2017", root))
    sizes = dict(zip(index.doc_id, zip(index.width, index.height)))
    assert sizes == {"1-IMG_MAX_1": (160, 120), "2-IMG_MAX_2": (120, 160)}


LABELLED = {"folder": ("path", "writer", {}), "icdar2019": ("FILENAME", "ID", {}),
            "words": ("path", "writer", {"words_per_page": 2, "page_width": 400})}


@pytest.mark.parametrize("adapter", sorted(LABELLED))
def test_empty_writer_label_in_labels_csv_is_rejected_naming_the_file(tmp_path, write_page, adapter):
    key, column, extra = LABELLED[adapter]
    root = tmp_path / "data"
    # "" and np.nan are both written as an empty cell; "NaN" as text; "   " is blank.
    writers = {"a.png": "ann", "b.png": " ann", "c.png": "", "d.png": "   ", "e.png": "NaN", "f.png": np.nan,
               "g.png": "bob", "h.png": "bob"}
    for i, name in enumerate(writers):
        write_page(root / name, seed=i)
    pd.DataFrame({key: list(writers), column: list(writers.values())}).to_csv(root / "labels.csv", index=False)
    settings = settings_for(adapter, root, labels="labels.csv", **extra)
    with pytest.raises(DatasetError, match=r"c\.png: empty writer label in labels\.csv"):
        run(tmp_path, settings)
    index, rejected = run(tmp_path, settings, on_bad_input="skip")
    reasons = reasons_by_name(rejected)
    assert sorted(reasons) == ["c.png", "d.png", "e.png", "f.png"]
    assert reasons["d.png"] == f"empty writer label in labels.csv (column '{column}' is '   ')"
    assert all(r.startswith("empty writer label") for r in reasons.values())
    assert set(index.writer) == {"ann", "bob"}  # " ann" is writer ann; no writer ''


@pytest.mark.parametrize("adapter", ["folder", "words"])
def test_filename_regex_with_empty_writer_group_is_rejected(tmp_path, write_page, adapter):
    root = tmp_path / "data"
    names = ["ann-p1.png", "ann-p2.png", "bob-p1.png", "bob-p2.png",
             "-p3.png", " -p4.png", "p5.png"]  # empty, blank, and not taking part (the group is optional)
    for i, name in enumerate(names):
        write_page(root / name, seed=i)
    pattern = r"(?:(?P<writer>[a-z ]*)-)?p(?P<page>\d+)\.png"
    settings = settings_for(adapter, root, pattern=pattern)
    with pytest.raises(DatasetError, match=r"p5\.png: empty writer label in the file name"):
        run(tmp_path, settings)
    index, rejected = run(tmp_path, settings, on_bad_input="skip")
    assert reasons_by_name(rejected) == {
        n: f"empty writer label in the file name (group 'writer' of pattern {pattern} is empty)"
        for n in ["-p3.png", " -p4.png", "p5.png"]}
    assert set(index.writer) == {"ann", "bob"}


def test_byte_identical_files_are_rejected_as_duplicates(tmp_path, write_page):
    root = tmp_path / "icdar17"
    # The adapter reads the split folders in sorted order (test, train), each sorted by name.
    first = write_page(root / "test" / "2-IMG_MAX_1.jpg", seed=1)
    write_page(root / "train" / "1-IMG_MAX_2.jpg", seed=2)
    shutil.copy(first, root / "test" / "2-IMG_MAX_9.jpg")
    shutil.copy(first, root / "train" / "1-IMG_MAX_3.jpg")  # the same scan again, in the other split
    # Same size, different bytes (uncompressed): compared, not duplicates.
    for n, seed in ((4, 4), (5, 5)):
        Image.fromarray(handwriting_like(seed=seed)).save(root / "test" / f"2-IMG_MAX_{n}.pgm")
    for n in (6, 7):  # two empty files are rejected as empty, not as copies of each other
        (root / "test" / f"2-IMG_MAX_{n}.png").write_bytes(b"")
    settings = settings_for("icdar2017", root, splits={"train": "train", "test": "test"})
    with pytest.raises(DatasetError, match=r"1-IMG_MAX_3\.jpg: duplicate of test/2-IMG_MAX_1\.jpg"):
        run(tmp_path, settings)
    index, rejected = run(tmp_path, settings, on_bad_input="skip")
    assert sorted(index.doc_id) == ["1-IMG_MAX_2", "2-IMG_MAX_1", "2-IMG_MAX_4", "2-IMG_MAX_5"]
    assert reasons_by_name(rejected) == {"1-IMG_MAX_3.jpg": "duplicate of test/2-IMG_MAX_1.jpg",
                                         "2-IMG_MAX_9.jpg": "duplicate of test/2-IMG_MAX_1.jpg",
                                         "2-IMG_MAX_6.png": "zero bytes", "2-IMG_MAX_7.png": "zero bytes"}


def test_duplicate_word_images_are_tiled_once(tmp_path, write_page):
    root = tmp_path / "words"
    for i, name in enumerate(["u1_a.png", "u1_b.png", "u2_a.png", "u2_b.png"]):
        write_page(root / name, seed=i)
    shutil.copy(root / "u1_a.png", root / "u1_c.png")
    settings = settings_for("words", root, pattern=r"(?P<writer>u\d)_(?P<word>\w)\.png", words_per_page=2,
                            page_width=400)
    _, rejected = run(tmp_path, settings, on_bad_input="skip")
    assert reasons_by_name(rejected) == {"u1_c.png": "duplicate of u1_a.png"}
    layout = pd.read_parquet(tmp_path / "out" / "generated" / "pages.parquet")
    assert sorted(layout.source_path.map(lambda p: p.rsplit("/", 1)[-1])) == [
        "u1_a.png", "u1_b.png", "u2_a.png", "u2_b.png"]


def test_source_manifest_follows_the_input_files(tmp_path, write_page):
    root = tmp_path / "icdar17"
    page = write_page(root / "1-IMG_MAX_1.jpg", seed=1)
    (root / "2-IMG_MAX_2.jpg").write_bytes(b"not decoded at DAG time")
    settings = settings_for("icdar2017", root)
    base = source_manifest(settings)
    assert re.fullmatch(r"2 files, sha256 [0-9a-f]{16}", base) and source_manifest(settings) == base
    (root / "notes.txt").write_text("ignored by the default 'ignore' patterns")
    assert source_manifest(settings) == base
    added = write_page(root / "3-IMG_MAX_3.jpg", seed=3)
    assert source_manifest(settings).startswith("3 files") and source_manifest(settings) != base
    added.unlink()
    assert source_manifest(settings) == base
    (root / "stray.doc").write_text("an input: it would be rejected")
    assert source_manifest(settings) != base
    (root / "stray.doc").unlink()
    st = page.stat()
    os.utime(page, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    touched = source_manifest(settings)
    assert touched != base
    write_page(page, seed=9, quality=50)  # replaced by another size, with the old mtime
    os.utime(page, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert page.stat().st_size != st.st_size and source_manifest(settings) not in (base, touched)
    (root / "2-IMG_MAX_2.jpg").unlink()
    assert source_manifest(settings).startswith("1 files")


def test_source_manifest_covers_split_folders_and_the_labels_csv(tmp_path, write_page):
    root = tmp_path / "data"
    write_page(root / "train" / "a.png", seed=1)
    write_page(root / "test" / "b.png", seed=2)
    labels = root / "labels.csv"
    pd.DataFrame({"path": ["a.png", "b.png"], "writer": ["ann", "bob"]}).to_csv(labels, index=False)
    settings = settings_for("folder", root, labels="labels.csv", splits={"train": "train", "test": "test"})
    base = source_manifest(settings)
    assert base.startswith("3 files")  # two pages and the labels CSV, although '*.csv' is ignored
    pd.DataFrame({"path": ["a.png", "b.png"], "writer": ["ann", "ann"]}).to_csv(labels, index=False)
    assert source_manifest(settings) != base
    (root / "unused").mkdir()
    write_page(root / "unused" / "c.png", seed=3)  # outside the split folders: not read by the adapter
    assert source_manifest(settings).startswith("3 files")


def test_source_manifest_of_a_missing_root_or_labels_is_a_clear_error(tmp_path, write_page):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=rf"{re.escape(str(missing))}: dataset folder does not exist .*'root'"):
        source_manifest(settings_for("icdar2017", missing))
    write_page(tmp_path / "data" / "a.png")
    with pytest.raises(DatasetError, match=r"labels\.csv: labels file not found \(check 'labels'"):
        source_manifest(settings_for("folder", tmp_path / "data", labels="labels.csv"))
    synthetic = validate_config({"datasets": {"s": {"adapter": "synthetic"}}, "experiments": [{"dataset": "s"}]})
    assert source_manifest(synthetic["datasets"]["s"]) == ""
