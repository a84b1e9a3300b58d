"""Fine-tuning (NetRVLAD + multi-similarity loss on cluster pseudo labels, early stopping on held-out
writers) and the patch encoder."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from test_saghog import TINY, stroke_patches, write_patch_shards
from writer_retrieval import finetune as FT
from writer_retrieval.errors import InputError
from writer_retrieval.normalise import power_l2
from writer_retrieval.pretrain import saghog as S
from writer_retrieval.metrics import evaluate
from writer_retrieval.storage import write_parquet

# Train pages a..f of writers w1..w3 (two pages each), test page g of w4.
DOCS = ((("a", 10), ("b", 8), ("c", 12)), (("d", 6), ("e", 8), ("f", 6), ("g", 5)))
WRITER = {"a": "w1", "b": "w1", "c": "w2", "d": "w2", "e": "w3", "f": "w3", "g": "w4"}


def ft_settings(**over):
    s = dict(method="netrvlad", pooling="cls_residual", epochs=2, lr=1e-3, min_lr=1e-5, warmup_epochs=0,
             weight_decay=0.01, weight_decay_end=0.01, clip_grad=1.0, layer_decay=0.25, clusters=4, m_per_class=2,
             classes_per_batch=3, max_patches=0, alpha=2.0, beta=40.0, base=0.2, margin=0.1, erode_p=0.5,
             dilate_p=0.5, validation_writers=0, patience=10, power=0.4, seed=0, num_workers=0, amp="none",
             checkpoint_every=1)
    s.update(over)
    return s


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Patch shards, the dataset index, the cluster table and a random-init encoder file."""
    root = tmp_path_factory.mktemp("ft")
    shards = write_patch_shards(root, DOCS)
    rng = np.random.default_rng(0)
    parts = []
    for s, (_, idx) in enumerate(shards):
        t = pd.read_parquet(idx)
        t["split"] = np.where(t.doc_id == "g", "test", "train")
        t["shard"] = np.int32(s)
        t["row"] = np.arange(len(t), dtype=np.int64)
        t["cluster"] = rng.integers(-1, 4, len(t)).astype(np.int32)
        t["ratio"] = np.float32(0.5)
        parts.append(t)
    labels = root / "patches.parquet"
    write_parquet(pd.concat(parts, ignore_index=True), labels)
    index = root / "index.parquet"
    write_parquet(pd.DataFrame({"doc_id": list(WRITER), "writer": list(WRITER.values()),
                                "split": ["train"] * 6 + ["test"]}), index)
    encoder = root / "backbone.pt"
    torch.save(S.build_encoder(TINY, seed=0).state_dict(), encoder)
    return {"shards": shards, "labels": labels, "index": index, "encoder": encoder, "root": root}


def run_finetune(data, out_dir, **over):
    return FT.finetune(data["shards"], data["labels"], data["index"], data["encoder"], TINY, ft_settings(**over),
                       out_dir, device="cpu", progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# -- NetRVLAD ---------------------------------------------------------------------------------

def test_netrvlad_residual_encoding_by_hand():
    layer = FT.NetRVLAD(dim=2, clusters=2, residual=True, intra_norm=False)
    with torch.no_grad():  # assignment 3:1 whatever the input: softmax(log 3, 0) = (0.75, 0.25)
        layer.assign.weight.zero_()
        layer.assign.bias.copy_(torch.tensor([math.log(3.0), 0.0]))
        layer.centroids.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    # x = (1, 2): V_1 = 0.75 (1, 2) = (0.75, 1.5), V_2 = 0.25 ((1, 2) - (1, 0)) = (0, 0.5);
    # no intra-norm; global L2 of (0.75, 1.5, 0, 0.5) (norm 1.75) = (3, 6, 0, 2) / 7
    v = layer(torch.tensor([[[1.0, 2.0]]]))
    torch.testing.assert_close(v, torch.tensor([[3.0, 6.0, 0.0, 2.0]]) / 7)


def test_netrvlad_tokens_pooling_shape_and_normalisation():
    torch.manual_seed(0)
    layer = FT.NetRVLAD(dim=8, clusters=5, **FT.POOLINGS["tokens"])
    assert layer.centroids is None
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


def test_kmeans_centroids_at_the_cluster_means():
    # 2-d "patches" around (0, 0) and (10, 10), offsets symmetric: the cluster means are exact
    offsets = torch.tensor([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.1], [0.0, -0.1]])
    points = torch.cat([offsets.repeat(5, 1), offsets.repeat(5, 1) + 10.0])
    dataset = torch.utils.data.TensorDataset(points[:, None, :], torch.zeros(len(points)))
    c = FT.kmeans_centroids(lambda x: x.flatten(1), dataset, 2, seed=0, batch_size=7, device=torch.device("cpu"))
    c = c[torch.argsort(c[:, 0])]
    torch.testing.assert_close(c, torch.tensor([[0.0, 0.0], [10.0, 10.0]]), atol=1e-5, rtol=0)


def test_layer_decay_groups_scale_the_lr_by_depth():
    net = FT.FinetuneNet(S.build_encoder(TINY, seed=0), clusters=4)  # depth 2
    groups = FT.layer_decay_groups(net, 0.25)
    scale = {id(p): (g["lr_scale"], g["wd_scale"]) for g in groups for p in g["params"]}
    named = dict(net.named_parameters())
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in named.values())
    expected = {"encoder.cls_token": (0.25 ** 3, 0.0), "encoder.patch_embed.proj.weight": (0.25 ** 3, 1.0),
                "encoder.blocks.0.attn.qkv.weight": (0.25 ** 2, 1.0), "encoder.blocks.1.mlp.fc1.weight": (0.25, 1.0),
                "encoder.blocks.1.norm1.bias": (0.25, 0.0), "encoder.norm.weight": (1.0, 0.0),
                "netrvlad.assign.weight": (1.0, 1.0), "netrvlad.centroids": (1.0, 1.0)}
    assert {k: scale[id(named[k])] for k in expected} == expected
    assert id(named["encoder.pos_embed"]) not in scale  # frozen sin-cos positions
    opt = torch.optim.AdamW(groups, lr=0.0)
    FT.apply_group_scales(opt, {"lr": 1e-3, "weight_decay": 0.01})
    lrs = {(g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert {round(lr / 1e-3, 6) for lr, _ in lrs} == {1.0, 0.25, 0.0625, 0.015625}
    assert {wd for _, wd in lrs} == {0.0, 0.01}


def test_erode_dilate():
    x = torch.zeros(3, 1, 8, 8)
    x[:, 0, 2:6, 2:6] = 1.0  # a 4 x 4 ink square
    g = torch.Generator().manual_seed(0)
    eroded = FT.erode_dilate(x, 1.0, 0.0, g)
    assert (eroded[:, 0, 3:5, 3:5] == 1).all() and eroded.sum() == 3 * 4
    dilated = FT.erode_dilate(x, 0.0, 1.0, g)
    assert (dilated[:, 0, 1:7, 1:7] == 1).all() and dilated.sum() == 3 * 36
    assert torch.equal(FT.erode_dilate(x, 0.0, 0.0, g), x)
    border = torch.ones(1, 1, 4, 4)  # ink up to the border stays: the outside is not background
    assert torch.equal(FT.erode_dilate(border, 1.0, 0.0, g), border)


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
    loss = FT.multi_similarity_loss(emb, labels, alpha=2.0, beta=50.0, base=0.5)
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


# -- validation and early stopping -----------------------------------------------------------

def test_early_stopping_keeps_the_best_epoch():
    early = FT.EarlyStopping(patience=2)
    for epoch, value in enumerate([0.30, 0.50, 0.40, 0.45, 0.60], start=1):
        if early.stopped:
            break
        early.update(epoch, value, lambda: {"weights of epoch": epoch})  # noqa: B023
    assert early.stopped and early.last_epoch == 4  # 2 epochs without a better mAP after epoch 2
    assert (early.best_epoch, early.best_map, early.best_state) == (2, 0.50, {"weights of epoch": 2})
    again = FT.EarlyStopping(patience=5)
    again.load_state_dict(early.state_dict())
    assert again.stopped and again.best_epoch == 2


def test_validation_split_holds_out_whole_writers(data):
    s = FT.settings_with_defaults(ft_settings(validation_writers=2))
    train_set, validation = FT.training_patches(data["shards"], data["labels"], data["index"], s)
    table = pd.read_parquet(data["labels"])
    key = list(zip(table.shard, table.row))
    doc_of = dict(zip(key, table.doc_id))
    train_writers = {WRITER[doc_of[tuple(r)]] for r in train_set.rows}
    val_writers = {WRITER[doc_of[tuple(r)]] for r in validation.patches.rows}
    assert len(val_writers) == 2 and len(train_writers) == 1 and not train_writers & val_writers
    assert "w4" not in train_writers | val_writers  # the test split is never used
    # every patch of a held-out page is in the validation set, labelled or not (cluster -1)
    held = table[table.doc_id.map(WRITER).isin(val_writers)]
    assert len(validation.patches) == len(held) and (held.cluster == -1).any()
    assert sorted(validation.writers) == sorted(WRITER[d] for d in held.doc_id.unique())
    assert FT.held_out_writers(pd.Series({"w1": 2, "w2": 2, "w3": 1}), 0, 0) == []
    assert len(FT.held_out_writers(pd.Series({f"w{i}": 3 for i in range(30)}), 0.1, 0)) == 3  # ceil(0.1 x 30)
    with pytest.raises(InputError, match="validation_writers"):  # w3 has a single page
        FT.held_out_writers(pd.Series({"w1": 2, "w2": 2, "w3": 1}), 3, 0)


def test_validation_map_is_the_retrieval_map_of_summed_encodings(data):
    s = FT.settings_with_defaults(ft_settings(validation_writers=2))
    _, validation = FT.training_patches(data["shards"], data["labels"], data["index"], s)
    net = FT.FinetuneNet(S.build_encoder(TINY, seed=1), clusters=4).eval()
    x = torch.stack([validation.patches[i] for i in range(len(validation.patches))])
    with torch.no_grad():
        y = net(x).double().numpy()
    sums = np.zeros((len(validation.writers), y.shape[1]))
    np.add.at(sums, validation.page_of_patch.numpy(), y)
    expected = evaluate(power_l2(sums, 0.4), validation.writers)[0]["map"]
    assert validation.map(net, torch.device("cpu")) == pytest.approx(expected, abs=1e-6)


def test_finetune_stops_early_and_exports_the_best_epoch(data, tmp_path, monkeypatch):
    curve = iter([0.2, 0.6, 0.5, 0.4, 0.9])
    monkeypatch.setattr(FT.Validation, "map", lambda self, net, device: next(curve))
    out = run_finetune(data, tmp_path / "A", epochs=5, patience=2, validation_writers=2)
    assert (out["epochs"], out["best_epoch"], out["val_map"]) == (4, 2, 0.6)
    log = pd.read_parquet(tmp_path / "A" / "log.parquet")
    assert log.epoch.tolist() == [1, 2, 3, 4] and log.val_map.tolist() == [0.2, 0.6, 0.5, 0.4]
    assert log.best_epoch.tolist() == [1, 2, 2, 2] and (log.loss > 0).all()
    # the exported weights are those after epoch 2 (a run stopped there, as if killed)
    curve = iter([0.2, 0.6])
    FT.finetune(data["shards"], data["labels"], data["index"], data["encoder"], TINY,
                ft_settings(epochs=5, patience=2, validation_writers=2), tmp_path / "B", device="cpu",
                progress=False, stop_after_epochs=2)
    epoch2 = torch.load(tmp_path / "B" / "checkpoint.pt", weights_only=False)["trainer"]["net"]
    model = torch.load(tmp_path / "A" / "model.pt", weights_only=True)
    assert model["pooling"] == "cls_residual"
    for part in ("encoder", "netrvlad"):
        assert all(torch.equal(v, epoch2[f"{part}.{k}"]) for k, v in model[part].items())


# -- training -------------------------------------------------------------------------------

def test_finetune_loss_decreases_on_a_fixed_batch(data):
    # tokens pooling: on a random-init encoder, whose [CLS] hardly varies, the [CLS] pooling only collapses
    s = FT.settings_with_defaults(ft_settings(pooling="tokens", lr=5e-3, min_lr=5e-3, layer_decay=1.0, erode_p=0.0,
                                              dilate_p=0.0))
    assert s["batch_size"] == 6
    train_set, _ = FT.training_patches(data["shards"], data["labels"], data["index"], s)
    trainer = FT.FinetuneTrainer(s, TINY, data["encoder"], train_set, torch.device("cpu"), niter_per_epoch=100)
    assert trainer.opt.lr_schedule[0] == 5e-3  # absolute lr: not scaled by the batch size
    x = torch.from_numpy(stroke_patches(24, seed=5).astype(np.float32))[:, None]
    y = torch.arange(6).repeat_interleave(4)
    logs = [trainer.step((x, y), i, 0) for i in range(30)]
    # random init: every embedding is alike (a plateau near 1.1), then the clusters separate
    assert np.mean([r["loss"] for r in logs[-4:]]) < 0.8 * np.mean([r["loss"] for r in logs[:4]])
    assert all(0.0 <= r["valid_anchors"] <= 1.0 for r in logs)


def test_finetune_stage_writes_model_and_resumes(data, tmp_path):
    a = run_finetune(data, tmp_path / "A")
    table = pd.read_parquet(data["labels"])
    n_train = int(((table.split == "train") & (table.cluster >= 0)).sum())
    assert a["epochs"] == 2 and a["samples"] == n_train  # validation_writers 0: every train writer
    model = torch.load(tmp_path / "A" / "model.pt", weights_only=True)
    assert set(model) == {"encoder", "netrvlad", "pooling"} and model["netrvlad"]["assign.weight"].shape == (4, 32)
    assert model["netrvlad"]["centroids"].shape == (4, 32) and model["netrvlad"]["centroids"].abs().sum() > 0
    log = pd.read_parquet(tmp_path / "A" / "log.parquet")
    assert log.epoch.tolist() == [1, 2] and {"loss", "valid_anchors", "lr", "weight_decay"} <= set(log.columns)
    assert log.val_map.isna().all()
    assert 1e-5 <= log.lr.min() and log.lr.max() < 1e-3  # cosine from the absolute lr to min_lr
    s = ft_settings()
    FT.finetune(data["shards"], data["labels"], data["index"], data["encoder"], TINY, s, tmp_path / "B",
                device="cpu", progress=False, stop_after_epochs=1)
    b = run_finetune(data, tmp_path / "B")
    assert b["resumed_from_epoch"] == 1
    mb = torch.load(tmp_path / "B" / "model.pt", weights_only=True)
    for part in ("encoder", "netrvlad"):
        assert all(torch.equal(model[part][k], mb[part][k]) for k in model[part])
    # the pre-trained encoder was trained further
    start = torch.load(data["encoder"], weights_only=True)
    assert not torch.equal(start["blocks.0.attn.qkv.weight"], model["encoder"]["blocks.0.attn.qkv.weight"])


def test_finetune_errors(data, tmp_path):
    t = pd.read_parquet(data["labels"])
    t["split"] = "test"
    write_parquet(t, tmp_path / "none.parquet")
    with pytest.raises(InputError, match="no train-split patch"):
        FT.finetune(data["shards"], tmp_path / "none.parquet", data["index"], data["encoder"], TINY, ft_settings(),
                    tmp_path, device="cpu", progress=False)
    with pytest.raises(InputError, match="method"):
        FT.settings_with_defaults(ft_settings(method="arcface"))
    with pytest.raises(InputError, match="pooling"):
        FT.settings_with_defaults(ft_settings(pooling="mean"))
    no_power = {k: v for k, v in ft_settings(validation_writers=0.5).items() if k != "power"}
    with pytest.raises(InputError, match="power"):
        FT.settings_with_defaults(no_power)


@pytest.mark.parametrize("pooling", ["cls_residual", "tokens"])
def test_patch_encoder_with_and_without_finetuning(data, tmp_path, pooling):
    patches = stroke_patches(5, seed=9)
    x = torch.from_numpy(patches.astype(np.float32))[:, None]
    plain = FT.patch_encoder(data["encoder"], TINY, device="cpu", batch_size=2)
    out = plain(patches)
    assert out.shape == (5, 32) and out.dtype == np.float32 and plain.dim == 32
    enc = S.load_encoder(data["encoder"], TINY, "cpu")
    with torch.no_grad():
        np.testing.assert_allclose(out, enc.forward_features(x)[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    assert plain(patches[:0]).shape == (0, 32)
    run_finetune(data, tmp_path, epochs=1, pooling=pooling)
    tuned = FT.patch_encoder(data["encoder"], TINY, tmp_path / "model.pt", ft_settings(), device="cpu")
    v = tuned(patches)
    assert v.shape == (5, 4 * 32) and tuned.dim == 128
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    net = FT.load_finetuned(tmp_path / "model.pt", TINY)
    assert net.pooling == pooling and (net.netrvlad.centroids is None) == (pooling == "tokens")
    with torch.no_grad():
        np.testing.assert_allclose(v, net(x).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="clusters"):
        FT.patch_encoder(data["encoder"], TINY, tmp_path / "model.pt", ft_settings(clusters=7), device="cpu")
