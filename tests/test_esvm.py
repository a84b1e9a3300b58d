import json

import numpy as np
import pandas as pd
import pytest

from writer_retrieval.errors import InputError
from writer_retrieval.esvm import encode_shard, exemplar_svm, gather
from writer_retrieval.pca import descriptor_table, read_descriptors
from writer_retrieval.storage import write_parquet

SETTINGS = {"C": 1000.0, "class_weight": "balanced"}


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def writers_like(n_writers, docs_per_writer, dim, spread, seed):
    """L2-normalised descriptors clustered around one random centre per writer."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_writers, dim)))
    writer = np.repeat(np.arange(n_writers), docs_per_writer)
    return unit(centres[writer] + spread * rng.standard_normal((len(writer), dim))), writer


def test_symmetric_negatives_give_the_axis_of_the_positive():
    # negatives symmetric around the origin in the plane orthogonal to e1: by symmetry the only
    # separating direction the SVM can prefer is e1 itself, oriented towards the positive
    rng = np.random.default_rng(0)
    half = rng.standard_normal((100, 3))
    half[:, 0] = 0
    negatives = np.vstack([half, -half])
    for sign in (1, -1):
        w = exemplar_svm(np.array([2.0 * sign, 0, 0]), negatives, SETTINGS)
        assert w.dtype == np.float32 and w.shape == (3,)
        assert sign * w[0] > 0.99  # cos(w, sign * e1): scores the positive higher
        assert np.linalg.norm(w) == pytest.approx(1.0, abs=1e-6)


def test_documents_of_one_writer_get_near_identical_vectors():
    negatives, _ = writers_like(60, 5, 32, 0.5, seed=1)
    test, _ = writers_like(2, 2, 32, 0.03, seed=2)  # writer A: rows 0, 1; writer B: rows 2, 3
    w = np.array([exemplar_svm(x, negatives, SETTINGS) for x in test])
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-6)
    cos = w @ w.T
    assert cos[0, 1] > 0.9 and cos[2, 3] > 0.9
    assert cos[:2, 2:].max() < 0.2  # the other writer's vectors point elsewhere


@pytest.mark.parametrize("class_weight", ["balanced", "none"])
def test_more_dimensions_than_negatives_solve_in_their_span_with_the_same_answer(class_weight):
    from sklearn.svm import LinearSVC

    from writer_retrieval.esvm import LIBLINEAR

    rng = np.random.default_rng(3)
    negatives = rng.normal(size=(40, 300))
    negatives /= np.linalg.norm(negatives, axis=1, keepdims=True)
    positive = negatives[:3].mean(axis=0) + 0.3 * rng.normal(size=300) / np.sqrt(300)
    direct = LinearSVC(C=1000.0, class_weight=None if class_weight == "none" else "balanced", **LIBLINEAR)
    direct.fit(np.vstack([positive, negatives]), np.r_[1, np.zeros(40, int)])
    expected = direct.coef_.ravel() / np.linalg.norm(direct.coef_)
    got = exemplar_svm(positive, negatives, {"C": 1000.0, "class_weight": class_weight})
    assert got.shape == (300,) and float(got @ expected) > 0.9999


def test_exemplar_svm_is_deterministic_and_checks_its_input():
    negatives, _ = writers_like(40, 5, 16, 0.5, seed=3)
    positive = unit(np.random.default_rng(4).standard_normal(16))
    a = exemplar_svm(positive, negatives, SETTINGS)
    b = exemplar_svm(positive, negatives.copy(), dict(SETTINGS))
    assert a.tobytes() == b.tobytes()
    unweighted = exemplar_svm(positive, negatives, {"C": 1000.0, "class_weight": "none"})
    assert np.linalg.norm(unweighted) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(InputError, match="class_weight must be one of"):
        exemplar_svm(positive, negatives, {"C": 1000.0, "class_weight": "auto"})
    with pytest.raises(ValueError, match=r"positive must have shape \(16,\)"):
        exemplar_svm(positive[:8], negatives, SETTINGS)


def descriptors_file(path, doc_ids, splits, vectors, writers=None):
    """A descriptors.parquet (and its index) as the PCA stage writes them."""
    index = pd.DataFrame({"doc_id": doc_ids, "split": splits,
                          "writer": writers if writers is not None else [f"w{i // 2}" for i in range(len(doc_ids))]})
    write_parquet(descriptor_table(doc_ids, index, np.asarray(vectors, np.float32)), path)
    return index


@pytest.fixture
def dataset(tmp_path):
    """8 documents in table order, 5 test and 3 train, plus 30 extra train documents as negatives."""
    x, _ = writers_like(19, 2, 12, 0.3, seed=5)
    splits = ["test", "train", "test", "test", "train", "test", "train", "test"] + ["train"] * 30
    doc_ids = [f"d{i:02d}" for i in range(len(splits))]
    index = descriptors_file(tmp_path / "descriptors.parquet", doc_ids, splits, x[:len(splits)])
    index.to_parquet(tmp_path / "index.parquet")
    return tmp_path, index, x[:len(splits)]


def encode_all(root, negatives, shards, shard_size=3):
    vectors, ids = [], []
    for shard in range(shards):
        vectors.append(root / f"esvm_{shard}.npy")
        ids.append(root / f"esvm_{shard}.parquet")
        encode_shard(root / "descriptors.parquet", negatives, SETTINGS, shard, shard_size, vectors[-1], ids[-1])
    return vectors, ids


def test_shards_and_gather_encode_every_test_document_once(dataset):
    root, index, _ = dataset
    descriptors = root / "descriptors.parquet"
    counts = [encode_shard(descriptors, descriptors, SETTINGS, s, 3, root / f"v{s}.npy", root / f"i{s}.parquet")
              for s in range(3)]
    assert counts == [2, 2, 1]  # rows 0-2: d00, d02; rows 3-5: d03, d05; rows 6-8: d07
    beyond = encode_shard(descriptors, descriptors, SETTINGS, 20, 3, root / "v20.npy", root / "i20.parquet")
    assert beyond == 0 and np.load(root / "v20.npy").shape == (0, 12)
    assert pd.read_parquet(root / "i20.parquet").doc_id.tolist() == []

    vectors = [root / f"v{s}.npy" for s in (0, 1, 2, 20)]
    ids = [root / f"i{s}.parquet" for s in (0, 1, 2, 20)]
    gather(vectors, ids, descriptors, root / "index.parquet", root / "esvm.parquet", root / "esvm.json")
    table, w = read_descriptors(root / "esvm.parquet")
    assert table.doc_id.tolist() == ["d00", "d02", "d03", "d05", "d07"]  # test only, table order
    assert (table.split == "test").all() and table.writer.tolist() == ["w0", "w1", "w1", "w2", "w3"]
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-6)

    # the same vectors as one E-SVM per document against the 33 train rows, bit for bit
    _, stored = read_descriptors(descriptors)  # float32, as the shards saw them
    expected = exemplar_svm(stored[7], stored[np.array(index.split) == "train"], SETTINGS)
    assert w[4].tobytes() == expected.tobytes()

    info = json.loads((root / "esvm.json").read_text())
    assert info["n_encoded"] == 5 and info["n_negatives"] == 33 and info["dim"] == 12
    assert info["settings"] == SETTINGS and info["liblinear"]["dual"] is True


def test_gather_names_missing_and_duplicated_documents(dataset):
    root, _, _ = dataset
    vectors, ids = encode_all(root, root / "descriptors.parquet", 3)
    out = root / "esvm.parquet", root / "esvm.json"
    with pytest.raises(InputError, match=r"1 missing \(d07\)"):
        gather(vectors[:2], ids[:2], root / "descriptors.parquet", root / "index.parquet", *out)
    with pytest.raises(InputError, match=r"encoded more than once \(d00, d02\)"):
        gather(vectors + vectors[:1], ids + ids[:1], root / "descriptors.parquet", root / "index.parquet", *out)
    assert not out[0].exists()


def test_negatives_from_another_dataset(dataset, tmp_path):
    root, _, _ = dataset
    other, _ = writers_like(10, 3, 12, 0.3, seed=6)
    descriptors_file(tmp_path / "other.parquet", [f"o{i}" for i in range(30)], ["train"] * 30, other)
    vectors, ids = encode_all(root, tmp_path / "other.parquet", 3)
    gather(vectors, ids, root / "descriptors.parquet", root / "index.parquet", root / "esvm.parquet",
           root / "esvm.json")
    info = json.loads((root / "esvm.json").read_text())
    assert info["n_negatives"] == 30 and info["negatives"].endswith("other.parquet")


def test_clear_errors_for_unusable_negatives(dataset, tmp_path):
    root, _, _ = dataset
    descriptors_file(tmp_path / "no_train.parquet", ["a", "b"], ["test", "validation"], np.eye(2, 12))
    with pytest.raises(InputError, match=r"no_train\.parquet: no documents with split 'train'"):
        encode_all(root, tmp_path / "no_train.parquet", 1)
    descriptors_file(tmp_path / "narrow.parquet", ["a", "b"], ["train", "train"], np.eye(2, 8))
    with pytest.raises(InputError, match=r"narrow\.parquet: descriptors have 8 dimensions, but those of "
                                         r".*descriptors\.parquet have 12"):
        encode_all(root, tmp_path / "narrow.parquet", 1)
