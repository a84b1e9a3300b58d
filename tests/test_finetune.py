"""Fine-tuning (NetRVLAD + multi-similarity loss on cluster pseudo labels) and the patch encoder."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from test_saghog import TINY, stroke_patches, write_patch_shards
from writer_retrieval import finetune as FT
from writer_retrieval.errors import InputError
from writer_retrieval.pretrain import saghog as S
from writer_retrieval.storage import write_parquet


def ft_settings(**over):
    s = dict(method="netrvlad", epochs=2, lr=1e-3, min_lr=1e-5, warmup_epochs=0, weight_decay=0.05,
             weight_decay_end=0.05, clip_grad=0.0, clusters=4, m_per_class=2, classes_per_batch=3, max_patches=0,
             alpha=2.0, beta=50.0, base=0.5, margin=0.1, seed=0, num_workers=0, amp="none", checkpoint_every=1)
    s.update(over)
    return s


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Patch shards, the cluster table (train: a, b, c; test: d) and a random-init encoder file."""
    root = tmp_path_factory.mktemp("ft")
    shards = write_patch_shards(root)
    rng = np.random.default_rng(0)
    parts = []
    split_of = {"a": "train", "b": "train", "c": "train", "d": "test"}
    for s, (_, idx) in enumerate(shards):
        t = pd.read_parquet(idx)
        t["split"] = t.doc_id.map(split_of)
        t["shard"] = np.int32(s)
        t["row"] = np.arange(len(t), dtype=np.int64)
        t["cluster"] = rng.integers(-1, 4, len(t)).astype(np.int32)
        t["ratio"] = np.float32(0.5)
        parts.append(t)
    labels = root / "patches.parquet"
    write_parquet(pd.concat(parts, ignore_index=True), labels)
    encoder = root / "backbone.pt"
    torch.save(S.build_encoder(TINY, seed=0).state_dict(), encoder)
    return {"shards": shards, "labels": labels, "encoder": encoder, "root": root}


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# -- NetRVLAD ---------------------------------------------------------------------------------

def test_netrvlad_shape_and_normalisation():
    torch.manual_seed(0)
    layer = FT.NetRVLAD(dim=8, clusters=5)
    x = torch.randn(3, 64, 8)
    v = layer(x)
    assert v.shape == (3, 40)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3))
    blocks = v.reshape(3, 5, 8).norm(dim=-1)  # intra-normalised blocks, equal after the global L2
    torch.testing.assert_close(blocks, torch.full((3, 5), 1 / math.sqrt(5)))
    # by hand for one sample: a_ik = softmax(w_k x_i + b_k), V_k = sum_i a_ik x_i (no centroids)
    a = torch.softmax(x[0] @ layer.assign.weight.t() + layer.assign.bias, dim=1)
    V = a.t() @ x[0]
    V = V / V.norm(dim=1, keepdim=True)
    torch.testing.assert_close(v[0], V.reshape(-1) / V.reshape(-1).norm(), rtol=1e-5, atol=1e-6)


# -- multi-similarity loss -------------------------------------------------------------------

def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_multi_similarity_loss_by_hand():
    # labels 0, 0, 1, 1 at angles 0, 50, 30, 120 degrees: cosines are cos(angle differences)
    emb = torch.tensor([unit(0), unit(50), unit(30), unit(120)]) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    c = lambda d: math.cos(math.radians(d))  # noqa: E731
    pos = lambda ss: 0.5 * math.log(1 + sum(math.exp(-2 * (x - 0.5)) for x in ss))  # noqa: E731
    neg = lambda ss: math.log(1 + sum(math.exp(50 * (x - 0.5)) for x in ss)) / 50  # noqa: E731
    # anchor 0: positive 1 (cos 50 = .643); negatives 2 (cos 30 = .866) and 3 (cos 120 = -.5);
    #   mined negatives > .643 - .1: only 2; mined positives < .866 + .1: 1
    # anchor 1: positive 0 (.643); negatives 2 (cos 20 = .940) and 3 (cos 70 = .342): only 2 kept
    # anchor 2: positive 3 (cos 90 = 0); negatives 0 (.866), 1 (.940): both > 0 - .1
    # anchor 3: positive 2 (0); negatives 0 (-.5), 1 (.342): only 1 > -.1
    expected = (pos([c(50)]) + neg([c(30)])
                + pos([c(50)]) + neg([c(20)])
                + pos([c(90)]) + neg([c(30), c(20)])
                + pos([c(90)]) + neg([c(70)])) / 4
    loss = FT.multi_similarity_loss(emb, labels)
    assert abs(loss.item() - expected) < 1e-5
    # an anchor whose positive is easier than every negative (after the margin) contributes 0
    easy = torch.tensor([unit(0), unit(0), unit(180), unit(180)])
    assert FT.multi_similarity_loss(easy, labels).item() == 0.0
    # gradients are finite even when no pair is mined
    e = easy.clone().requires_grad_(True)
    FT.multi_similarity_loss(e, labels).backward()
    assert torch.isfinite(e.grad).all()


# -- m-per-class batches ---------------------------------------------------------------------

def test_m_per_class_batches():
    labels = np.array([-1] * 5 + [0] * 10 + [1] * 6 + [2] * 3 + [3] * 1 + [4] * 8)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    full = FT.m_per_class_batches(labels, 4, 2, 0, seed=1, epoch=0)
    assert len(full) == 27 // 8  # 27 labelled samples, batches of 2 x 4
    for batch in full:
        lab = labels[batch]
        assert len(batch) == 8 and (lab >= 0).all() and 3 not in lab  # singleton class skipped
        classes, counts = np.unique(lab, return_counts=True)
        assert len(classes) == 2 and (counts == 4).all()
        for k in classes:
            if k != 2:  # classes with >= m samples: no sample twice in a batch
                assert len(set(np.asarray(batch)[lab == k])) == 4
    assert FT.m_per_class_batches(labels, 4, 2, 0, seed=1, epoch=0) == full
    assert FT.m_per_class_batches(labels, 4, 2, 0, seed=1, epoch=1) != full
    assert len(FT.m_per_class_batches(labels, 4, 2, 40, seed=1, epoch=0)) == 5  # cap
    r0 = FT.m_per_class_batches(labels, 4, 2, 0, seed=1, epoch=0, rank=0, world_size=2)
    r1 = FT.m_per_class_batches(labels, 4, 2, 0, seed=1, epoch=0, rank=1, world_size=2)
    assert len(r0) == len(r1) == 1 and [r0[0], r1[0]] == full[:2]  # disjoint batches, same plan
    # a class with fewer than m samples is filled with replacement; cycling visits every sample
    many = FT.m_per_class_batches(labels, 4, 2, 400, seed=1, epoch=0)
    used = set(i for b in many for i in b)
    assert used == set(np.flatnonzero((labels >= 0) & (labels != 3)).tolist())
    with pytest.raises(InputError):
        FT.m_per_class_batches(np.array([0, 0, 0, -1]), 2, 2, 0, 0, 0)


# -- training -------------------------------------------------------------------------------

def test_finetune_loss_decreases_on_a_fixed_batch(data):
    s = FT.settings_with_defaults(ft_settings(lr=5e-3, min_lr=5e-3))
    assert s["batch_size"] == 6
    trainer = FT.FinetuneTrainer(s, TINY, data["encoder"], torch.device("cpu"), niter_per_epoch=100)
    assert trainer.opt.lr_schedule[0] == 5e-3  # absolute lr: not scaled by the batch size
    x = torch.from_numpy(stroke_patches(24, seed=5).astype(np.float32))[:, None]
    y = torch.arange(6).repeat_interleave(4)
    logs = [trainer.step((x, y), i, 0) for i in range(30)]
    # random init: every embedding is alike (a plateau near 0.93), then the clusters separate
    assert np.mean([r["loss"] for r in logs[-4:]]) < 0.8 * np.mean([r["loss"] for r in logs[:4]])
    assert all(0.0 <= r["valid_anchors"] <= 1.0 for r in logs)


def test_finetune_stage_writes_model_and_resumes(data, tmp_path):
    s = ft_settings()
    a = FT.finetune(data["shards"], data["labels"], data["encoder"], TINY, s, tmp_path / "A", device="cpu",
                    progress=False)
    table = pd.read_parquet(data["labels"])
    n_train = int(((table.split == "train") & (table.cluster >= 0)).sum())
    assert a["epochs"] == 2 and a["samples"] == n_train
    model = torch.load(tmp_path / "A" / "model.pt", weights_only=True)
    assert set(model) == {"encoder", "netrvlad"} and model["netrvlad"]["assign.weight"].shape == (4, 32)
    log = pd.read_parquet(tmp_path / "A" / "log.parquet")
    assert log.epoch.tolist() == [1, 2] and {"loss", "valid_anchors", "lr", "weight_decay"} <= set(log.columns)
    assert 1e-5 <= log.lr.min() and log.lr.max() < 1e-3  # cosine from the absolute lr to min_lr
    FT.finetune(data["shards"], data["labels"], data["encoder"], TINY, s, tmp_path / "B", device="cpu",
                progress=False, stop_after_epochs=1)
    b = FT.finetune(data["shards"], data["labels"], data["encoder"], TINY, s, tmp_path / "B", device="cpu",
                    progress=False)
    assert b["resumed_from_epoch"] == 1
    mb = torch.load(tmp_path / "B" / "model.pt", weights_only=True)
    for part in model:
        assert all(torch.equal(model[part][k], mb[part][k]) for k in model[part])
    # the pre-trained encoder was trained further
    start = torch.load(data["encoder"], weights_only=True)
    assert not torch.equal(start["blocks.0.attn.qkv.weight"], model["encoder"]["blocks.0.attn.qkv.weight"])


def test_finetune_errors(data, tmp_path):
    t = pd.read_parquet(data["labels"])
    t["split"] = "test"
    write_parquet(t, tmp_path / "none.parquet")
    with pytest.raises(InputError, match="no train-split patch"):
        FT.finetune(data["shards"], tmp_path / "none.parquet", data["encoder"], TINY, ft_settings(), tmp_path,
                    device="cpu", progress=False)
    with pytest.raises(InputError, match="method"):
        FT.settings_with_defaults(ft_settings(method="arcface"))


def test_patch_encoder_with_and_without_finetuning(data, tmp_path):
    patches = stroke_patches(5, seed=9)
    x = torch.from_numpy(patches.astype(np.float32))[:, None]
    plain = FT.patch_encoder(data["encoder"], TINY, device="cpu", batch_size=2)
    out = plain(patches)
    assert out.shape == (5, 32) and out.dtype == np.float32 and plain.dim == 32
    enc = S.load_encoder(data["encoder"], TINY, "cpu")
    with torch.no_grad():
        np.testing.assert_allclose(out, enc.forward_features(x)[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    assert plain(patches[:0]).shape == (0, 32)
    FT.finetune(data["shards"], data["labels"], data["encoder"], TINY, ft_settings(epochs=1), tmp_path,
                device="cpu", progress=False)
    tuned = FT.patch_encoder(data["encoder"], TINY, tmp_path / "model.pt", ft_settings(), device="cpu")
    v = tuned(patches)
    assert v.shape == (5, 4 * 32) and tuned.dim == 128
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    net = FT.load_finetuned(tmp_path / "model.pt", TINY)
    with torch.no_grad():
        np.testing.assert_allclose(v, net(x).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="clusters"):
        FT.patch_encoder(data["encoder"], TINY, tmp_path / "model.pt", ft_settings(clusters=7), device="cpu")
