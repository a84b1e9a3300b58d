"""Exemplar SVMs (E-SVM; Christlein et al.): a new descriptor per test document.

For every test document a linear SVM is trained with that document as the single positive and
all *train* documents (of this dataset, or of another one: cross-dataset transfer) as negatives;
the L2-normalised weight vector (coef_, without the intercept) replaces the descriptor. Test
documents are then compared by these vectors: what is typical of the train writers is no longer
what makes two documents similar.

liblinear options (scikit-learn LinearSVC) and why:
  C = settings["C"] (published 1000), class_weight = settings["class_weight"] (published
    "balanced": the one positive weighs as much as all negatives together).
  dual=True: liblinear's dual coordinate descent, as Christlein's public code (LinearSVC with its
    dual default). One positive against thousands of negatives in a few hundred dimensions is
    linearly separable, the dual solution is sparse (few support vectors), and the dual converges
    in tens of epochs. The primal Newton solver (dual=False, which sklearn's dual="auto" would
    pick since samples > features) needs hundreds of Newton steps at C = 1000: measured at 4,000
    negatives x 384 dims, 1 s per SVM against 0.05 s, and not closer to the exact solution.
  loss="squared_hinge", tol=1e-4, max_iter=1000: the liblinear/sklearn defaults the published
    code used; the dual stops after ~30-400 epochs, well inside max_iter. A fit that hits
    max_iter is counted and logged, not silenced.
  fit_intercept=True (liblinear: a constant feature 1, regularised with w), as the published code:
    a single point is always separable from a set by an affine hyperplane, but not by one through
    the origin (L2-normalised negatives surround the positive): without the intercept the solver
    never converges (1000 epochs, 5 s per SVM) and the weight vector is meaningless.
  random_state=0: the dual visits samples in a random order; a fixed seed makes every vector
    bit-identical between runs and independent of the shard layout.

Descriptors with more dimensions than negatives (shrinkage whitening keeps the D dimensions of a
VLAD vector, 12,800-19,200, against a few hundred train pages) are solved in the span of the
training points: the weight vector of an L2-regularised linear SVM is a combination of them, and
liblinear's objective and iterates depend on the data only through inner products, which an
orthonormal basis of the span (the negatives' QR basis plus the positive's residual) preserves.
Same solution up to rounding, at N + 1 instead of D features per SVM.
"""
from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC
from tqdm import tqdm

from .errors import InputError
from .pca import descriptor_table, read_descriptors
from .storage import write_json, write_npy, write_parquet

log = logging.getLogger("writer_retrieval")

LIBLINEAR = {"loss": "squared_hinge", "dual": True, "tol": 1e-4, "max_iter": 1000, "fit_intercept": True,
             "intercept_scaling": 1.0, "random_state": 0}
CLASS_WEIGHTS = {"balanced": "balanced", "none": None}


class ExemplarTrainer:
    """E-SVMs of many positives against one fixed negative set.

    The training matrix (positive in row 0, negatives below) is built once, in liblinear's float64,
    and only row 0 changes per positive: no copy of the negatives per SVM."""

    def __init__(self, negatives: np.ndarray, settings: dict):
        negatives = np.asarray(negatives)
        if negatives.ndim != 2 or len(negatives) == 0:
            raise ValueError(f"E-SVM needs a non-empty (N, D) matrix of negatives, got shape {negatives.shape}")
        if settings["class_weight"] not in CLASS_WEIGHTS:
            raise InputError(f"esvm class_weight must be one of {sorted(CLASS_WEIGHTS)}, "
                             f"got {settings['class_weight']!r}")
        self.svm = LinearSVC(C=float(settings["C"]), class_weight=CLASS_WEIGHTS[settings["class_weight"]],
                             **LIBLINEAR)
        self.dim = negatives.shape[1]
        self.basis = None  # (D, N) orthonormal basis of the negatives' span, when D > N + 1
        if self.dim > len(negatives) + 1:
            self.basis, upper = np.linalg.qr(np.asarray(negatives, np.float64).T)
            negatives = np.hstack([upper.T, np.zeros((len(negatives), 1))])  # coordinates, + residual axis
        self.problem = np.empty((len(negatives) + 1, negatives.shape[1]), np.float64)
        self.problem[1:] = negatives
        self.labels = np.zeros(len(self.problem), np.int8)
        self.labels[0] = 1  # classes_ = [0, 1]: coef_ scores the positive higher

    def fit(self, positive: np.ndarray) -> tuple[np.ndarray, bool]:
        """(L2-normalised weight vector as float32, whether liblinear converged)."""
        positive = np.asarray(positive)
        if positive.shape != (self.dim,):
            raise ValueError(f"E-SVM positive must have shape ({self.dim},), got {positive.shape}")
        if self.basis is None:
            self.problem[0] = positive
        else:
            inside = self.basis.T @ positive
            residual = positive - self.basis @ inside
            self.problem[0] = np.append(inside, np.linalg.norm(residual))
        with warnings.catch_warnings():
            # counted by the caller from n_iter_: one warning per SVM would flood the log
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.svm.fit(self.problem, self.labels)
        w = self.svm.coef_.ravel()
        if self.basis is not None:  # back to the descriptor space
            length = np.linalg.norm(residual)
            w = self.basis @ w[:-1] + (residual / length * w[-1] if length > 0 else 0.0)
        norm = np.linalg.norm(w)
        if not norm > 0:
            raise ValueError("E-SVM weight vector is zero: the positive cannot be told from the negatives")
        return (w / norm).astype(np.float32), int(self.svm.n_iter_) < LIBLINEAR["max_iter"]


def exemplar_svm(positive: np.ndarray, negatives: np.ndarray, settings: dict) -> np.ndarray:
    """L2-normalised weight vector (D,) float32 of an SVM: `positive` against all `negatives`."""
    w, converged = ExemplarTrainer(negatives, settings).fit(positive)
    if not converged:
        log.warning("E-SVM: liblinear stopped at max_iter=%d before converging", LIBLINEAR["max_iter"])
    return w


def train_rows(table: pd.DataFrame, matrix: np.ndarray, path) -> np.ndarray:
    """The rows with split 'train' of a descriptors file: the E-SVM negatives."""
    train = (table.split == "train").to_numpy()
    if not train.any():
        raise InputError(f"{path}: no documents with split 'train' to use as E-SVM negatives "
                         f"(splits present: {sorted(table.split.unique())})")
    return matrix[train]


def read_negatives(negatives_path, descriptors_path, table: pd.DataFrame, matrix: np.ndarray) -> np.ndarray:
    """Train rows of `negatives_path` (the already read positives' file when it is the same file)."""
    if Path(negatives_path).resolve() != Path(descriptors_path).resolve():
        table, negatives_matrix = read_descriptors(negatives_path)
        if negatives_matrix.shape[1] != matrix.shape[1]:
            raise InputError(f"{negatives_path}: descriptors have {negatives_matrix.shape[1]} dimensions, but those "
                             f"of {descriptors_path} have {matrix.shape[1]}; E-SVM negatives and positives must "
                             "live in the same descriptor space")
        matrix = negatives_matrix
    return train_rows(table, matrix, negatives_path)


def _doc_id_table(doc_ids, provenance: dict) -> pa.Table:
    # gather has no settings of its own: the schema metadata carries them (and the negative set)
    table = pa.table({"doc_id": pa.array(list(doc_ids), pa.string())})
    return table.replace_schema_metadata({"esvm": json.dumps(provenance, sort_keys=True, default=str)})


def encode_shard(descriptors_path, negatives_path, settings: dict, shard: int, shard_size: int,
                 vectors_out, doc_ids_out) -> int:
    """E-SVM vectors of the test documents among rows [shard*shard_size, (shard+1)*shard_size)."""
    table, matrix = read_descriptors(descriptors_path)
    negatives = read_negatives(negatives_path, descriptors_path, table, matrix)
    rows = slice(shard * shard_size, (shard + 1) * shard_size)
    test = (table.split.iloc[rows] == "test").to_numpy()
    doc_ids = table.doc_id.iloc[rows][test].tolist()
    positives = matrix[rows][test]
    trainer = ExemplarTrainer(negatives, settings)
    vectors = np.zeros((len(doc_ids), matrix.shape[1]), np.float32)
    unconverged = 0
    for i, positive in enumerate(tqdm(positives, desc=f"e-svm shard {shard}", unit="svm", mininterval=2)):
        vectors[i], converged = trainer.fit(positive)
        unconverged += not converged
    if unconverged:
        log.warning("E-SVM shard %d: %d of %d SVMs stopped at max_iter=%d before converging", shard, unconverged,
                    len(doc_ids), LIBLINEAR["max_iter"])
    write_npy(vectors, vectors_out)
    provenance = {"n_negatives": len(negatives), "negatives": str(negatives_path), "settings": dict(settings)}
    write_parquet(_doc_id_table(doc_ids, provenance), doc_ids_out)
    log.info("E-SVM shard %d: %d test documents against %d train negatives of %s", shard, len(doc_ids),
             len(negatives), negatives_path)
    return len(doc_ids)


def _read_shards(vector_paths, doc_id_paths) -> tuple[list[str], np.ndarray, list[dict]]:
    """Concatenated doc ids and vectors of the shards, in order, and each shard's provenance."""
    if len(vector_paths) != len(doc_id_paths) or not vector_paths:
        raise ValueError(f"E-SVM gather needs as many vector files as doc-id files (at least one), got "
                         f"{len(vector_paths)} and {len(doc_id_paths)}")
    doc_ids, vectors, provenance = [], [], []
    for vector_path, doc_id_path in zip(vector_paths, doc_id_paths):
        v = np.load(vector_path)
        ids_table = pq.read_table(doc_id_path)
        ids = ids_table.column("doc_id").to_pylist()
        if v.ndim != 2 or len(v) != len(ids):
            raise InputError(f"{vector_path}: {v.shape} vectors, but {doc_id_path} lists {len(ids)} documents")
        if vectors and v.shape[1] != vectors[0].shape[1]:
            raise InputError(f"{vector_path}: {v.shape[1]}-dimensional vectors, the first shard's are "
                             f"{vectors[0].shape[1]}-dimensional")
        metadata = ids_table.schema.metadata or {}
        if b"esvm" not in metadata:
            raise InputError(f"{doc_id_path}: not written by the E-SVM stage (no esvm metadata)")
        provenance.append(json.loads(metadata[b"esvm"]))
        doc_ids += ids
        vectors.append(v.astype(np.float32, copy=False))
    return doc_ids, np.concatenate(vectors), provenance


def check_coverage(doc_ids: list[str], expected: list[str], descriptors_path) -> None:
    """Every test document of the descriptors file encoded exactly once, nothing else."""
    counts = Counter(doc_ids)
    duplicated = sorted(d for d, c in counts.items() if c > 1)
    missing = sorted(set(expected) - set(counts))
    unexpected = sorted(set(counts) - set(expected))
    problems = [f"{len(items)} {what} ({', '.join(items[:5])}{', ...' if len(items) > 5 else ''})"
                for what, items in (("missing", missing), ("encoded more than once", duplicated),
                                    ("not test documents of that file", unexpected)) if items]
    if problems:
        raise InputError(f"E-SVM shards do not cover the test documents of {descriptors_path} exactly once: "
                         + "; ".join(problems))


def gather(vector_paths, doc_id_paths, descriptors_path, index_path, out_path, info_path) -> pa.Table:
    """Concatenate the shards into a descriptors.parquet of the test documents' E-SVM vectors."""
    doc_ids, vectors, provenance = _read_shards(vector_paths, doc_id_paths)
    table = pq.read_table(descriptors_path, columns=["doc_id", "split"]).to_pandas()  # not the descriptors
    check_coverage(doc_ids, table.doc_id[table.split == "test"].tolist(), descriptors_path)
    stale = [path for path, p in zip(doc_id_paths, provenance) if p != provenance[0]]
    if stale:
        raise InputError(f"E-SVM shard {stale[0]} was trained with other negatives or settings than "
                         f"{doc_id_paths[0]} (a stale shard?); rerun the E-SVM stage")
    out = descriptor_table(doc_ids, pd.read_parquet(index_path), vectors)
    write_parquet(out, out_path)
    info = {"n_encoded": len(doc_ids), "dim": int(vectors.shape[1]), "liblinear": LIBLINEAR, **provenance[0]}
    write_json(info, info_path)
    log.info("E-SVM: %d test documents encoded against %d negatives (%d dims)", info["n_encoded"],
             info["n_negatives"], info["dim"])
    return out
