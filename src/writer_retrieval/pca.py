"""PCA whitening stage: fit on the train split (default) or the test split (transductive, recorded),
or load a model another descriptors stage fitted (cross-dataset transfer); transform, L2-normalise,
and write descriptors.parquet (doc_id, writer, split, descriptor).

Methods (settings["pca"]). All fit the first k = min(pca_dims, n_fit - 1, D) principal components
(variances var_j) of the n_fit fit rows and scale component j by s_j before the final L2:

  none    no PCA: the page vectors only L2-normalised.
  whiten  project onto the components, s_j = 1 / sqrt(var_j); components below RANK_TOLERANCE
          (1e-6) of the largest variance dropped, since whitening divides by ~0 there. The behaviour
          before the other methods existed, kept bit-identical. k-dim output.
  shrink  shrinkage whitening: x -> (C + lambda * m * I)^(-1/2) (x - mean), with C the rank-k
          covariance estimate, m = median(var) over the k components and lambda =
          settings["pca_shrinkage"] > 0. Along component j the scale is 1 / sqrt(var_j + lambda m):
          components well above lambda m are whitened, weaker ones damped (weight ~ sqrt(var_j /
          (lambda m)) of a whitened one) instead of being blown up to unit variance. Every direction
          the fit rows do not span (sample variance 0) keeps the target scale 1 / sqrt(lambda m)
          instead of being discarded: with a small train split most of a test page's centred
          vector lies outside the span of the train pages (75-90 % for VLAD on the demo), and
          projecting it away is what costs whiten most of its mAP there. The target is relative to
          the median, not the mean, eigenvalue: summed page encodings (SAGHOG, [CLS] sums) have one
          component with 90-98 % of the variance and a spectrum spanning ~9 decades, so the mean is
          ~var_1 / k and would damp everything below ~1e-3 var_1, where their writer information
          lies (bench/whitening.py); for the flat spectra of VLAD the two are about equal.
          lambda -> inf is centring only; on a full-rank fit (k = D) lambda -> 0 is whiten.
          Scale-free (x -> c x changes nothing); output in the D input dimensions, like none.
  power   project onto the components, s_j = var_j ** -p, p = settings["pca_power"] in (0, 0.5):
          the variance along component j becomes var_j ** (1 - 2p), the spectrum compressed on a log
          scale (0.5 = whiten, 0 = plain rotation). k-dim output.

shrink and power have no hand-set guard: they drop only numerically-zero components (variance below
NUMERICAL_ZERO = 1e-12 of the largest: the fit rows' rank deficiency, whose directions are
arbitrary); for shrink such a component simply joins the unspanned rest of the space.

Measured (bench/whitening.py: demo and AHAWP word pages; SIFT and random-ViT VLAD, random-ViT and
SAGHOG sums; 25 / 50 / 100 % of the train writers): shrink with pca_shrinkage 0.3 is never below
whiten in any cell, equals none on SIFT where whiten loses 7-29 points, and beats whiten by 2-18
points on SAGHOG; power, like whiten, projects the test pages onto the train span and loses there.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.decomposition import PCA

from .errors import InputError
from .normalise import power_l2
from .storage import atomic_path, read_array_shard, write_json, write_parquet

log = logging.getLogger("writer_retrieval")

METHODS = ("none", "whiten", "shrink", "power")
# Components whose variance is below this share of the largest are noise or rank deficiency:
# whitening would divide by ~0 and blow them up, so whiten drops them.
RANK_TOLERANCE = 1e-6
# shrink / power: below this share of the largest variance a component is numerically zero (float32
# page vectors carry relative variance noise ~1e-14): its direction is arbitrary, so it is dropped.
NUMERICAL_ZERO = 1e-12
# The settings key of each method's regularisation value (recorded in pca.json).
REGULARISATION_KEY = {"none": None, "whiten": "rank_tolerance", "shrink": "pca_shrinkage", "power": "pca_power"}


def principal_axes(x: np.ndarray, dims: int, seed: int = 0) -> PCA:
    """The first min(dims, n - 1, d) principal axes of the n x d rows of `x` (sklearn, full SVD)."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    k = min(dims, n - 1, d)
    if k < 1:
        raise ValueError(f"PCA needs at least 2 documents to fit on, got {n}")
    if k < dims:
        log.info("PCA: %d dims requested, but %d fit documents x %d dims allow at most %d; using %d",
                 dims, n, d, min(n - 1, d), k)
    return PCA(n_components=k, svd_solver="full", random_state=seed).fit(x)


class Whitening:
    """PCA with a per-component scale: transform = L2((x - mean) P^T * scale). See the module doc."""

    def __init__(self, dims: int, seed: int = 0, method: str = "whiten", shrinkage: float | None = None,
                 power: float | None = None, rank_tolerance: float = RANK_TOLERANCE):
        if method not in METHODS:
            raise InputError(f"pca: unknown method {method!r}; one of {', '.join(METHODS)}")
        if method == "shrink" and not (shrinkage is not None and shrinkage > 0):
            raise InputError(f"pca: shrink needs pca_shrinkage > 0, got {shrinkage!r}")
        if method == "power" and not (power is not None and 0 < power < 0.5):
            raise InputError(f"pca: power needs 0 < pca_power < 0.5, got {power!r}")
        self.dims = dims
        self.seed = seed
        self.method = method
        self.shrinkage = shrinkage
        self.power = power
        self.rank_tolerance = rank_tolerance
        self.fit_on_ = None  # the split fitted on, when known (whiten() records it; saved)
        self.residual_scale_ = 0.0  # scale of the directions the components do not span (0: projected away)

    @property
    def regularisation(self) -> float | None:
        return {"none": None, "whiten": self.rank_tolerance, "shrink": self.shrinkage,
                "power": self.power}[self.method]

    def fit(self, x: np.ndarray, axes: PCA | None = None) -> "Whitening":
        """Fit on the rows of `x`; `axes`: their principal_axes(x, dims, seed), when already computed
        (bench/whitening.py scores many methods on one decomposition)."""
        x = np.asarray(x, np.float64)
        n, d = x.shape
        self.input_dim_ = d
        self.n_fit_ = n
        if self.method == "none":
            self.mean_ = np.zeros(0)
            self.components_ = np.zeros((0, d))
            self.scale_ = np.zeros(0)
            self.explained_variance_ratio_ = np.zeros(0)
            self.residual_scale_ = 0.0
            return self
        pca = principal_axes(x, self.dims, self.seed) if axes is None else axes
        if pca.mean_.shape != (d,):
            raise ValueError(f"principal axes of {pca.mean_.shape[0]}-d vectors given for {d}-d rows")
        var = pca.explained_variance_
        tolerance = self.rank_tolerance if self.method == "whiten" else NUMERICAL_ZERO
        keep = var > tolerance * var.max()
        if not keep.all():
            log.info("PCA: dropped %d of %d components with ~zero variance (below %g of the largest)",
                     int((~keep).sum()), len(var), tolerance)
        self.mean_ = pca.mean_
        self.components_ = pca.components_[keep]
        if self.method == "whiten":
            self.scale_ = 1.0 / np.sqrt(var[keep])
        elif self.method == "shrink":
            target = self.shrinkage * float(np.median(var[keep]))
            self.scale_ = 1.0 / np.sqrt(var[keep] + target)
            self.residual_scale_ = 1.0 / np.sqrt(target)
        else:
            self.scale_ = var[keep] ** -self.power
        self.explained_variance_ratio_ = pca.explained_variance_ratio_[keep]
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if self.method == "none":
            return power_l2(np.asarray(x, np.float32))
        centred = np.asarray(x, np.float64) - self.mean_
        y = centred @ self.components_.T * self.scale_
        if self.residual_scale_:
            # In the input space: the spanned part scaled per component, the rest by residual_scale_.
            y = centred * self.residual_scale_ + (y - centred @ self.components_.T * self.residual_scale_) \
                @ self.components_
        return power_l2(y).astype(np.float32)

    @property
    def output_dim(self) -> int:
        if self.method == "none" or self.residual_scale_:
            return self.input_dim_
        return int(self.components_.shape[0])

    def save(self, path) -> None:
        """npz: mean, components, scale, method (and what pca.json records). Method none saves empty
        arrays and method "none", so a stage that loads it knows to apply no PCA."""
        with atomic_path(path, ".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, mean=self.mean_, components=self.components_, scale=self.scale_,
                         method=np.array(self.method), input_dim=np.array(self.input_dim_),
                         n_fit=np.array(-1 if self.n_fit_ is None else self.n_fit_), dims=np.array(self.dims), seed=np.array(self.seed),
                         regularisation=np.array(np.nan if self.regularisation is None else self.regularisation),
                         explained_variance_ratio=self.explained_variance_ratio_,
                         fit_on=np.array("" if self.fit_on_ is None else self.fit_on_),
                         residual_scale=np.array(float(self.residual_scale_)))

    @classmethod
    def load(cls, path) -> "Whitening":
        try:
            with np.load(path, allow_pickle=False) as z:
                method = str(z["method"])
                reg = float(z["regularisation"]) if "regularisation" in z else float("nan")
                reg = None if np.isnan(reg) else reg
                model = cls(int(z["dims"]) if "dims" in z else int(z["components"].shape[0]),
                            int(z["seed"]) if "seed" in z else 0, method,
                            shrinkage=reg if method == "shrink" else None,
                            power=reg if method == "power" else None,
                            rank_tolerance=reg if method == "whiten" and reg is not None else RANK_TOLERANCE)
                model.mean_ = np.asarray(z["mean"], np.float64)
                model.components_ = np.asarray(z["components"], np.float64)
                model.scale_ = np.asarray(z["scale"], np.float64)
                model.input_dim_ = int(z["input_dim"]) if "input_dim" in z else int(z["components"].shape[1])
                model.n_fit_ = int(z["n_fit"]) if "n_fit" in z and int(z["n_fit"]) >= 0 else None
                model.explained_variance_ratio_ = (np.asarray(z["explained_variance_ratio"], np.float64)
                                                   if "explained_variance_ratio" in z else np.zeros(0))
                model.fit_on_ = (str(z["fit_on"]) or None) if "fit_on" in z else None
                model.residual_scale_ = float(z["residual_scale"]) if "residual_scale" in z else 0.0
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"{path}: not a whitening model saved by a descriptors stage ({exc})") from None
        if model.method != "none" and not (model.components_.ndim == 2
                                           and model.components_.shape == (len(model.scale_), len(model.mean_))):
            raise InputError(f"{path}: inconsistent whitening model (components {model.components_.shape}, "
                             f"scale {model.scale_.shape}, mean {model.mean_.shape})")
        return model


def model_from_settings(settings: dict) -> Whitening:
    """The (unfitted) model the settings ask for. Reads only the keys its method uses (method none
    needs no other key)."""
    method = settings["pca"]
    if method == "none":
        return Whitening(0, 0, "none")
    return Whitening(settings["pca_dims"], settings["seed"], method,
                     shrinkage=settings["pca_shrinkage"] if method == "shrink" else None,
                     power=settings["pca_power"] if method == "power" else None)


DESCRIPTOR_COLUMNS = ["doc_id", "writer", "split", "descriptor"]


def descriptor_table(doc_ids, index: pd.DataFrame, vectors: np.ndarray) -> pa.Table:
    meta = index.set_index("doc_id").loc[list(doc_ids)]
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).ravel(), pa.float32())
    return pa.table({"doc_id": pa.array(list(doc_ids), pa.string()),
                     "writer": pa.array(meta.writer.tolist(), pa.string()),
                     "split": pa.array(meta.split.tolist(), pa.string()),
                     "descriptor": pa.FixedSizeListArray.from_arrays(flat, dim)})


def read_descriptors(path) -> tuple[pd.DataFrame, np.ndarray]:
    """(doc_id/writer/split table, N x D float32 matrix) from a descriptors.parquet."""
    table = pq.read_table(path)
    column = table.column("descriptor").combine_chunks()
    dim = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
    return table.drop(["descriptor"]).to_pandas(), matrix


def sum_pooled_cls(cls_path, shard_index_path) -> dict[str, np.ndarray]:
    """doc_id -> sum of the page's window [CLS] tokens (zeros for a page without foreground)."""
    shard = read_array_shard(cls_path, shard_index_path, count="n_windows", offset="cls_offset")
    return {d: np.asarray(rows, np.float64).sum(axis=0).astype(np.float32) for d, rows in shard.items()}


def whiten(doc_ids, vectors: np.ndarray, index_path, settings: dict, out_path, info_path,
           model_path=None, fitted_path=None) -> pa.Table:
    """Fit the settings' PCA method on `settings['pca_fit_on']` rows (or load the model at
    `fitted_path`, fitted by another descriptors stage), transform all rows, write
    descriptors.parquet, pca.json and (at `model_path`) the model."""
    index = pd.read_parquet(index_path)
    split_of = dict(zip(index.doc_id, index.split))
    splits = np.array([split_of[d] for d in doc_ids])
    info = {"n_docs": len(doc_ids), "input_dim": int(vectors.shape[1])}
    if fitted_path is not None:
        model = Whitening.load(fitted_path)
        if model.input_dim_ != vectors.shape[1]:
            raise InputError(f"{fitted_path}: the whitening model was fitted on {model.input_dim_}-d vectors, "
                             f"but this stage's page vectors are {vectors.shape[1]}-d")
        wanted = model_from_settings(settings).method
        if wanted != model.method:
            log.warning("PCA: settings ask for %s, the loaded model %s is %s; applying the loaded model",
                        wanted, fitted_path, model.method)
        # pca_fit_on: the split of the *other* dataset the model was fitted on.
        if model.fit_on_ and model.fit_on_ != settings["pca_fit_on"]:
            raise InputError(f"{fitted_path}: the whitening model was fitted on the {model.fit_on_} split, "
                             f"but pca_fit_on is {settings['pca_fit_on']}")
        info.update(model="loaded", model_from=str(fitted_path), n_fit=model.n_fit_, pca_fit_on=settings["pca_fit_on"])
        log.info("PCA: %s model loaded from %s (%d -> %d dims)", model.method, fitted_path,
                 vectors.shape[1], model.output_dim)
    else:
        model = model_from_settings(settings)
        if model.method == "none":
            model.fit(np.zeros((0, vectors.shape[1])))
            info.update(n_fit=0, pca_fit_on="")
        else:
            fit_on = settings["pca_fit_on"]
            fit_rows = vectors[splits == fit_on]
            if fit_on == "test":
                log.warning("PCA is fit on the test split (transductive); recorded as pca_fit_on=test")
            model.fit(fit_rows)
            model.fit_on_ = fit_on
            info.update(n_fit=int(len(fit_rows)), pca_fit_on=fit_on)
        info.update(model="fitted", model_from=None)
    out = model.transform(vectors)
    key = REGULARISATION_KEY[model.method]
    # pca_dims: the principal components with a scale of their own (the descriptor is k-dim for
    # whiten and power, input_dim for none and shrink: descriptor_dim).
    info.update(pca=model.method, pca_dims=0 if model.method == "none" else int(model.components_.shape[0]),
                descriptor_dim=int(out.shape[1]), regularisation_key=key, regularisation=model.regularisation,
                explained_variance=float(model.explained_variance_ratio_.sum()))
    if key is not None:
        info[key] = model.regularisation
    if model.method != "none":
        log.info("PCA (%s, %s=%s) on %s documents: %d components (%.1f%% variance), %d -> %d dims",
                 model.method, key, model.regularisation, info["n_fit"], info["pca_dims"],
                 100 * info["explained_variance"], vectors.shape[1], out.shape[1])
    if model_path is not None:
        model.save(model_path)
        info["model_path"] = str(model_path)
    table = descriptor_table(doc_ids, index, out)
    write_parquet(table, out_path)
    write_json(info, info_path)
    return table
