"""SAGHOG: HOG targets, masking, MAE loss, patch dataset, pretraining with checkpoint/resume."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from writer_retrieval.errors import InputError
from writer_retrieval.pretrain import run
from writer_retrieval.pretrain import saghog as S
from writer_retrieval.pretrain.loop import seeded_generator
from writer_retrieval.storage import write_npy, write_parquet

TINY = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
        "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}


def settings(**over):
    s = dict(method="saghog", model=dict(TINY), epochs=2, batch_size=16, lr=1e-3, min_lr=1e-5, warmup_epochs=1,
             weight_decay=0.05, weight_decay_end=0.05, clip_grad=0.0, mask_ratio=0.75, hog_bins=9, max_patches=48,
             seed=0, num_workers=0, amp="none", checkpoint_every=1)
    s.update(over)
    return s


def stroke_patches(n, seed=0, size=32):
    import cv2

    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size), np.uint8)
    for p in out:
        for _ in range(int(rng.integers(1, 4))):
            a, b = rng.integers(0, size, 2), rng.integers(0, size, 2)
            cv2.line(p, tuple(int(v) for v in a), tuple(int(v) for v in b), 1, thickness=int(rng.integers(1, 4)))
    return out


def write_patch_shards(root, docs_per_shard=((("a", 10), ("b", 8)), (("c", 12), ("d", 6))), seed=0):
    """Shards of fabricated stroke patches: [(patches.npy, index.parquet)], and the per-shard doc lists."""
    shards = []
    for s, docs in enumerate(docs_per_shard):
        n = sum(k for _, k in docs)
        patches = stroke_patches(n, seed=seed + s)
        doc_col = [d for d, k in docs for _ in range(k)]
        npy, idx = root / f"patches_{s}.npy", root / f"index_{s}.parquet"
        write_npy(patches, npy)
        write_parquet(pd.DataFrame({"doc_id": doc_col, "x": np.arange(n, dtype=np.int32),
                                    "y": np.arange(n, dtype=np.int32)}), idx)
        shards.append((str(npy), str(idx)))
    return shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_patch_shards(tmp_path_factory.mktemp("patches"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# -- HOG targets ------------------------------------------------------------------------------

def edge_patches():
    p = torch.zeros(4, 1, 32, 32)
    p[0, 0, :, :16] = 1  # vertical edge: horizontal gradient, 0 degrees
    p[1, 0, :16, :] = 1  # horizontal edge: vertical gradient, 90 degrees
    r, c = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    p[2, 0] = ((r + c) < 32).float()  # anti-diagonal edge: gradient at 45 degrees (rows grow downwards)
    return p  # p[3] empty


def test_hog_bins_of_hand_made_edges():
    h = S.hog_targets(edge_patches(), cell=4, bins=9)
    assert h.shape == (4, 64, 9) and h.dtype == torch.float32
    norms = h.norm(dim=-1)
    nonempty = norms > 0
    torch.testing.assert_close(norms[nonempty], torch.ones(int(nonempty.sum())), rtol=0, atol=1e-5)
    # vertical edge between columns 15 and 16: cells in columns 3 and 4 of every row, all in bin 0
    v = h[0].reshape(8, 8, 9)
    assert nonempty[0].reshape(8, 8)[:, [3, 4]].all() and nonempty[0].sum() == 16
    torch.testing.assert_close(v[:, [3, 4]], torch.eye(9)[0].expand(8, 2, 9))
    # horizontal edge: 90 degrees lies halfway between bin 4 (80) and bin 5 (100)
    hz = h[1][nonempty[1]]
    assert nonempty[1].reshape(8, 8)[[3, 4]].all() and nonempty[1].sum() == 16
    expected = torch.zeros(9)
    expected[4] = expected[5] = 1 / math.sqrt(2)
    torch.testing.assert_close(hz, expected.expand_as(hz), rtol=0, atol=1e-6)
    # 45 degrees: 0.75 to bin 2 (40), 0.25 to bin 3 (60) in the cells away from the patch border
    d = h[2].reshape(8, 8, 9)
    inner = torch.stack([d[i, 7 - i] for i in range(1, 7)])  # the cells on the anti-diagonal
    expected = torch.zeros(9)
    expected[2], expected[3] = 0.75, 0.25
    torch.testing.assert_close(inner, (expected / expected.norm()).expand_as(inner), rtol=0, atol=1e-5)
    assert int(h[2].sum(0).argmax()) == 2
    # an empty patch gives all zeros
    assert torch.equal(h[3], torch.zeros(64, 9))


def test_hog_orientation_wraps_and_is_unsigned():
    p = edge_patches()
    # inverting ink flips the gradient sign: unsigned orientation, same HOG
    torch.testing.assert_close(S.hog_targets(1 - p[:3]), S.hog_targets(p[:3]))
    # a gradient just below 180 degrees votes into bin 8 and (wrapping) bin 0
    r, c = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ramp = (c * math.cos(math.radians(175)) + r * math.sin(math.radians(175))) / 80 + 0.5  # in (0, 1)
    h = S.hog_targets(ramp[None, None])
    inner = h[0].reshape(8, 8, 9)[2:6, 2:6].reshape(-1, 9)
    w0, w8 = 0.75, 0.25  # 175 degrees = 8.75 bin widths: 5 from 180 (= bin 0), 15 from bin 8 (160)
    expected = torch.zeros(9)
    expected[0], expected[8] = w0, w8
    torch.testing.assert_close(inner, (expected / expected.norm()).expand_as(inner), rtol=0, atol=1e-4)
    with pytest.raises(ValueError):
        S.hog_targets(torch.zeros(1, 1, 30, 30))


# -- masking and the model --------------------------------------------------------------------

def test_masking_count_and_determinism():
    net = S.SaghogMAE(TINY, bins=9, seed=0)
    x = torch.from_numpy(stroke_patches(6).astype(np.float32))[:, None]
    pred, mask = net(x, 0.75, seeded_generator(0, 5, 0))
    assert pred.shape == (6, 64, 9) and mask.shape == (6, 64) and mask.dtype == torch.bool
    assert (mask.sum(1) == 48).all()
    pred2, mask2 = net(x, 0.75, seeded_generator(0, 5, 0))
    assert torch.equal(mask, mask2) and torch.equal(pred, pred2)
    _, other_it = net(x, 0.75, seeded_generator(0, 6, 0))
    _, other_rank = net(x, 0.75, seeded_generator(0, 5, 1))
    assert not torch.equal(mask, other_it) and not torch.equal(mask, other_rank)
    assert not torch.equal(mask[0], mask[1])  # per-sample masks
    # the encoder sees only the visible tokens: masked content does not change the prediction
    x2 = x.clone()
    tok = int(mask[0].nonzero()[0])
    r, c = divmod(tok, 8)
    x2[0, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 1 - x2[0, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4]
    pred3, _ = net(x2, 0.75, seeded_generator(0, 5, 0))
    torch.testing.assert_close(pred3, pred)


def test_encoder_layout_and_fixed_positions():
    enc = S.build_encoder(TINY, seed=0)
    assert enc.pos_embed.shape == (1, 65, 32) and not enc.pos_embed.requires_grad
    torch.testing.assert_close(enc.pos_embed, S.sincos_pos_embed(32, 8, 8))
    assert torch.equal(enc.pos_embed[0, 0], torch.zeros(32))
    assert enc.patch_embed.proj.in_channels == 1 and enc.num_classes == 0
    net = S.SaghogMAE(TINY, seed=0)
    assert net.encode(torch.zeros(2, 1, 32, 32)).shape == (2, 65, 32)
    a, b = S.build_encoder(TINY, seed=3), S.build_encoder(TINY, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_loss_only_on_masked_tokens():
    torch.manual_seed(0)
    pred, target = torch.rand(3, 64, 9), torch.rand(3, 64, 9)
    mask = torch.zeros(3, 64, dtype=torch.bool)
    mask[:, :48] = True
    loss = S.masked_mse(pred, target, mask)
    changed = pred.clone()
    changed[~mask] = 100.0
    assert torch.equal(S.masked_mse(changed, target, mask), loss)
    torch.testing.assert_close(loss, ((pred[:, :48] - target[:, :48]) ** 2).mean())
    changed[0, 0] += 1.0
    assert S.masked_mse(changed, target, mask) > loss


def test_mae_loss_decreases_on_a_fixed_batch():
    s = S.settings_with_defaults(settings(lr=3e-3, warmup_epochs=0, epochs=1))
    trainer = S.SaghogTrainer(s, torch.device("cpu"), niter_per_epoch=100)
    x = torch.from_numpy(stroke_patches(16, seed=3).astype(np.float32))[:, None]
    losses = [trainer.step(x, i, 0)["loss"] for i in range(12)]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


# -- data and the stage -----------------------------------------------------------------------

def test_patch_dataset_selects_documents(shards):
    ds = S.PatchDataset(shards, ["b", "c"])
    assert len(ds) == 8 + 12 and ds.patch_shape == (32, 32)
    assert ds.rows[:, 0].tolist() == [0] * 8 + [1] * 12 and ds.rows[:8, 1].tolist() == list(range(10, 18))
    item = ds[0]
    assert item.shape == (1, 32, 32) and item.dtype == torch.float32
    np.testing.assert_array_equal(item[0].numpy(), np.load(shards[0][0])[10].astype(np.float32))
    labelled = S.PatchDataset(shards, rows=[[1, 3], [0, 0]], labels=[7, 2])
    img, label = labelled[0]
    np.testing.assert_array_equal(img[0].numpy(), np.load(shards[1][0])[3])
    assert label.item() == 7 and label.dtype == torch.int64
    with pytest.raises(InputError, match="row 99"):
        S.PatchDataset(shards, rows=[[0, 99]])
    import pickle

    ds[1]
    clone = pickle.loads(pickle.dumps(ds))  # memory maps are not pickled
    assert clone._arrays == {} and torch.equal(clone[1], ds[1])


def test_pretrain_resume_gives_the_same_encoder(shards, tmp_path):
    s = settings()
    docs = ["a", "c", "d"]
    a = S.pretrain_saghog(shards, docs, s, tmp_path / "A", device="cpu", progress=False)
    assert a["epochs"] == 2 and a["samples"] == 28 and a["samples_per_epoch"] == 28
    first = run({"patch_shards": shards, "doc_ids": docs}, s, tmp_path / "B", device="cpu", progress=False,
                stop_after_epochs=1)
    assert first["stopped"] and not (tmp_path / "B" / "backbone.pt").exists()
    # resumed with a DataLoader worker process (the dataset's memory maps reopen there)
    b = S.pretrain_saghog(shards, docs, dict(s, num_workers=1), tmp_path / "B", device="cpu", progress=False)
    assert b["resumed_from_epoch"] == 1
    wa = torch.load(tmp_path / "A" / "backbone.pt", weights_only=True)
    wb = torch.load(tmp_path / "B" / "backbone.pt", weights_only=True)
    assert wa.keys() == wb.keys() and not any(k.startswith("decoder") for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = pd.read_parquet(tmp_path / "A" / "log.parquet"), pd.read_parquet(tmp_path / "B" / "log.parquet")
    assert la.epoch.tolist() == [1, 2] and {"loss", "lr", "weight_decay", "images_per_second"} <= set(la.columns)
    assert (la.loss_mean_hog > 0).all()  # the mean-HOG baseline the loss is judged against
    np.testing.assert_array_equal(la.loss.to_numpy(), lb.loss.to_numpy())
    # load_encoder round trip: same weights, eval mode, [CLS] first
    enc = S.load_encoder(tmp_path / "A" / "backbone.pt", s["model"], "cpu")
    assert not enc.training
    assert all(torch.equal(enc.state_dict()[k], wa[k]) for k in wa)
    x = torch.from_numpy(stroke_patches(3).astype(np.float32))[:, None]
    trainer = S.SaghogTrainer(S.settings_with_defaults(s), torch.device("cpu"), 1)
    trainer.net.encoder.load_state_dict(wa)
    trainer.net.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), trainer.net.encode(x))


def test_stage_errors(shards, tmp_path):
    with pytest.raises(InputError, match="no patches"):
        S.pretrain_saghog(shards, ["nobody"], settings(), tmp_path, device="cpu", progress=False)
    with pytest.raises(InputError, match="img_size"):
        S.pretrain_saghog(shards, ["a"], settings(model=dict(TINY, img_size=64)), tmp_path, device="cpu",
                          progress=False)
    with pytest.raises(InputError, match="mask_ratio"):
        S.settings_with_defaults(settings(mask_ratio=1.0))
    full = S.settings_with_defaults({"method": "saghog"})
    assert full["model"]["embed_dim"] == 512 and full["lr"] == 8e-4 and full["epochs"] == 200
