"""AttMask pretraining: masks, EMA, forward hooks, loss, checkpoint/resume, torchrun smoke run."""
import copy
import os
import subprocess
import sys
import json

import numpy as np
import pandas as pd
import pytest
import torch

from writer_retrieval import pretrain as P
from writer_retrieval.errors import InputError
from writer_retrieval.imaging import read_mask, write_mask

TINY = {"arch": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2,
        "num_heads": 2}


def settings(**over):
    s = dict(method="attmask", model=dict(TINY), epochs=2, batch_size=4, lr=0.01, min_lr=1e-6,
             warmup_epochs=0, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, momentum_teacher=0.996,
             teacher_temp=0.04, student_temp=0.1, patch_teacher_temp=0.07, out_dim=64, patch_out_dim=64,
             masking="attmask_high", mask_ratio=0.3, mask_probability=0.5, global_size=64, local_size=32,
             n_local_crops=2, global_scale=[0.4, 1.0], local_scale=[0.05, 0.4], window=256, max_windows=8,
             seed=0, num_workers=0, amp="none", checkpoint_every=1, head_hidden_dim=64, head_bottleneck_dim=32)
    s.update(over)
    return s


@pytest.fixture(scope="module")
def pages(tmp_path_factory, stroke_page):
    d = tmp_path_factory.mktemp("pages")
    paths = []
    for i in range(3):
        write_mask(d / f"page{i}.png", stroke_page(i))
        paths.append(str(d / f"page{i}.png"))
    empty = d / "blank.png"  # no ink: all its windows are skipped
    write_mask(empty, np.zeros((280, 260), bool))
    return paths + [str(empty)]


def fixed_batch(paths, s, n=8):
    s = P.attmask._settings_with_defaults(s)
    pgs, index, _ = P.load_pages(paths, int(s["window"]), 128, 0.01, False)
    ds = P.MultiCropDataset(pgs, index, s)
    items = [ds[i] for i in range(n)]
    return torch.stack([g for g, _ in items]), torch.stack([loc for _, loc in items])


# -- 1. attention-guided mask ----------------------------------------------------------------

def test_attention_mask_picks_the_most_attended_patches():
    att = torch.tensor([[0.05, 0.30, 0.01, 0.20, 0.14, 0.02, 0.08, 0.10, 0.06, 0.04],
                        [0.50, 0.00, 0.10, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.10]])
    m = P.attention_mask(att, 0.3)
    assert m.dtype == torch.bool and m.shape == att.shape
    assert m[0].nonzero().flatten().tolist() == [1, 3, 4]
    assert set(m[1].nonzero().flatten().tolist()) == {0, 2, 9}
    # round(ratio * N), halves up; bounds
    assert P.n_masked(10, 0.25) == 3 and P.n_masked(10, 0.24) == 2 and P.n_masked(196, 0.3) == 59
    assert P.attention_mask(att, 0.0).sum() == 0 and P.attention_mask(att, 1.0).all()
    assert P.attention_mask(att, 0.25).sum(1).tolist() == [3, 3]


# -- 2. EMA ----------------------------------------------------------------------------------

def test_ema_update_is_the_convex_combination():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4))
    teacher = copy.deepcopy(student)
    for p in student.parameters():
        p.data.add_(torch.randn_like(p))
    before = [p.clone() for p in teacher.parameters()]
    m = 0.9
    P.ema_update(teacher, student, m)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s, rtol=0, atol=1e-7)
    P.ema_update(teacher, student, 1.0)  # m = 1 keeps the teacher
    P.ema_update(teacher, student, 0.0)  # m = 0 copies the student
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)


# -- 3. the loss goes down -------------------------------------------------------------------

def test_loss_decreases_on_a_fixed_batch(pages):
    # Fixed teacher (momentum 1) and fixed centers: pure distillation, the student must fit it.
    s = settings(lr=0.05, momentum_teacher=1.0, center_momentum=1.0, mask_probability=1.0, epochs=1)
    g, loc = fixed_batch(pages, s)
    assert g.shape == (8, 2, 1, 64, 64) and loc.shape == (8, 2, 1, 32, 32)
    trainer = P.AttMaskTrainer(s, torch.device("cpu"), niter_per_epoch=100)
    logs = [trainer.step((g, loc), i, 0) for i in range(12)]
    first, last = logs[:3], logs[-3:]
    for key in ("loss", "loss_cls", "loss_patch"):
        assert np.mean([x[key] for x in last]) < np.mean([x[key] for x in first]), key
    assert all(x["n_masked"] == 16 * P.n_masked(16, 0.3) for x in logs)  # 2 views x 8 images, p = 1


# -- 5. masking modes --------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_random_and_block_masks_have_the_right_count(ratio):
    rng = np.random.default_rng(0)
    k = P.n_masked(196, ratio)
    assert (P.random_mask(6, 196, ratio, rng).sum(1) == k).all()
    bm = P.block_mask(6, (14, 14), ratio, rng)
    assert bm.shape == (6, 196) and (bm.sum(1) == k).all()
    # blocks are spatially coherent: far fewer isolated patches than random masking
    grid = bm[0].reshape(14, 14)
    neighbours = (np.roll(grid, 1, 0) | np.roll(grid, -1, 0) | np.roll(grid, 1, 1) | np.roll(grid, -1, 1))
    assert (grid & neighbours).sum() >= 0.8 * k


def test_trainer_masks_follow_mode_and_probability(pages):
    g, loc = fixed_batch(pages, settings(), n=4)
    gl = g.transpose(0, 1).reshape(8, 1, 64, 64)
    for mode in ("random", "block"):
        tr = P.AttMaskTrainer(settings(masking=mode, mask_probability=1.0), torch.device("cpu"), 10)
        m = tr.make_mask(8, (4, 4), None, it=3)
        assert (m.sum(1) == P.n_masked(16, 0.3)).all()
        assert torch.equal(m, tr.make_mask(8, (4, 4), None, it=3))  # seeded by iteration
    tr = P.AttMaskTrainer(settings(masking="attmask_high", mask_probability=1.0), torch.device("cpu"), 10)
    with torch.no_grad():
        _, _, att = tr.teacher(gl, with_attention=True)
        att_direct = P.last_block_cls_attention(tr.teacher.backbone, gl)
    torch.testing.assert_close(att, att_direct)
    assert torch.equal(tr.make_mask(8, (4, 4), att, it=0), P.attention_mask(att, 0.3))
    # with probability 0.5 a row is either not masked at all or exactly the attention mask
    tr.s["mask_probability"] = 0.5
    rows = [tr.make_mask(8, (4, 4), att, it=i) for i in range(5)]
    full = P.attention_mask(att, 0.3)
    for m in rows:
        for r in range(8):
            assert (not m[r].any()) or torch.equal(m[r], full[r])
    n_masked_rows = sum(int(m.any(1).sum()) for m in rows)
    assert 5 <= n_masked_rows <= 35


def test_cls_attention_matches_timm_attention_weights():
    net = P.build_backbone(TINY, seed=1).eval()
    blk = net.blocks[-1]
    blk.attn.fused_attn = False  # the explicit path passes the softmax weights through attn_drop
    captured = {}
    hook = blk.attn.attn_drop.register_forward_hook(lambda mod, inp, out: captured.setdefault("w", out))
    x = torch.rand(3, 1, 64, 48)
    with torch.no_grad():
        net.forward_features(x)
        att = P.last_block_cls_attention(net, x)
    hook.remove()
    expected = captured["w"][:, :, 0, net.num_prefix_tokens:].mean(1)
    assert att.shape == (3, 12)
    torch.testing.assert_close(att, expected, rtol=1e-5, atol=1e-6)


# -- 6. forward_tokens -------------------------------------------------------------------------

def test_forward_tokens_shapes_layers_and_mask_token():
    net = P.build_backbone(TINY, seed=0).eval()
    with torch.no_grad():
        net.mask_token.normal_()
        x = torch.rand(2, 1, 64, 64)
        tok = P.forward_tokens(net, x)
        assert tok.shape == (2, 1 + 16, 32)
        torch.testing.assert_close(tok, net.forward_features(x))  # same as timm without a mask
        assert P.forward_tokens(net, torch.rand(2, 1, 32, 48)).shape == (2, 1 + 6, 32)  # dynamic size
        layers = P.forward_tokens(net, x, return_layers=2)
        assert isinstance(layers, list) and len(layers) == 2
        assert all(t.shape == (2, 17, 32) for t in layers)
        torch.testing.assert_close(layers[-1], tok)
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[0, :5] = True
        masked = P.forward_tokens(net, x, mask=mask)
        assert not torch.allclose(masked[0], tok[0])
        torch.testing.assert_close(masked[1], tok[1])  # unmasked image unchanged
        # the mask token replaces the patch: masked patch content no longer matters
        x2 = x.clone()
        x2[0, :, :16, :16] = 1 - x2[0, :, :16, :16]  # patch 0 changed
        torch.testing.assert_close(P.forward_tokens(net, x2, mask=mask)[0], masked[0])
    with pytest.raises(ValueError):
        P.forward_tokens(net, x, return_layers=3)


def test_build_backbone_default_and_seeded():
    a, b = P.build_backbone(TINY, seed=3), P.build_backbone(TINY, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = P.build_backbone({"arch": "vit_small_patch16_224", "img_size": 224, "patch_size": 16})
    assert c.embed_dim == 384 and len(c.blocks) == 12 and c.blocks[0].attn.num_heads == 6
    assert c.patch_embed.proj.in_channels == 1 and c.num_classes == 0


def test_to_input_convention():
    w = np.array([[True, False], [False, True]])
    t = P.to_input(w)
    assert t.dtype == torch.float32 and t.shape == (1, 2, 2)
    assert t.tolist() == [[[1.0, 0.0], [0.0, 1.0]]]


def test_windows_match_the_page(pages):
    s = P.attmask._settings_with_defaults(settings())
    pgs, index, skipped = P.load_pages(pages, 256, 128, 0.01, False)
    assert skipped == 4 and len(index) == 12  # 300 px -> offsets 0, 44; blank page skipped
    ds = P.MultiCropDataset(pgs, index, s)
    for i in range(len(index)):
        p, y, x = index[i]
        np.testing.assert_array_equal(ds.window_at(i).astype(bool), read_mask(pages[p])[y:y + 256, x:x + 256])
    ds.set_epoch(1)
    g1, l1 = ds[3]
    g2, l2 = ds[3]
    assert torch.equal(g1, g2) and torch.equal(l1, l2)
    ds.set_epoch(2)
    assert not torch.equal(ds[3][0], g1)
    assert 0.0 <= float(g1.min()) and float(g1.max()) <= 1.0


# -- 4. checkpoint / resume ---------------------------------------------------------------------

def test_resume_gives_the_same_weights_as_an_uninterrupted_run(pages, tmp_path):
    # with the published recipe elements: the resume crosses the end of the last-layer freeze
    s = settings(epochs=2, masking="attmask_high", drop_path=0.1, freeze_last_layer=1, shared_head=True,
                 mask_ratio_var=0.2, clip_mode="per_parameter", warmup_patch_teacher_temp=0.04,
                 warmup_teacher_temp_epochs=2)
    a = P.pretrain(pages, s, tmp_path / "A", device="cpu", progress=False)
    assert a["epochs"] == 2 and a["samples"] == 12 and a["device"] == "cpu"
    first = P.pretrain(pages, s, tmp_path / "B", device="cpu", progress=False, stop_after_epochs=1)
    assert first["stopped"] and (tmp_path / "B" / "checkpoint.pt").exists()
    assert not (tmp_path / "B" / "backbone.pt").exists()
    b = P.pretrain(pages, dict(s, num_workers=1), tmp_path / "B", device="cpu", progress=False)
    assert b["resumed_from_epoch"] == 1
    wa = torch.load(tmp_path / "A" / "backbone.pt", weights_only=True)
    wb = torch.load(tmp_path / "B" / "backbone.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = pd.read_parquet(tmp_path / "A" / "log.parquet"), pd.read_parquet(tmp_path / "B" / "log.parquet")
    assert la.epoch.tolist() == lb.epoch.tolist() == [1, 2]
    np.testing.assert_array_equal(la.loss.to_numpy(), lb.loss.to_numpy())
    assert {"loss", "loss_cls", "loss_patch", "lr", "weight_decay", "momentum", "seconds",
            "images_per_second"} <= set(la.columns)
    # the saved backbone loads for inference
    net = P.load_backbone(tmp_path / "A" / "backbone.pt", s["model"])
    assert not net.training
    with torch.no_grad():
        assert P.forward_tokens(net, torch.zeros(1, 1, 64, 64)).shape == (1, 17, 32)
    # a finished run called again does not train again
    again = P.pretrain(pages, s, tmp_path / "A", device="cpu", progress=False)
    assert again["resumed_from_epoch"] == 2


def test_settings_are_checked(pages, tmp_path):
    s = settings()
    del s["mask_ratio"]
    with pytest.raises(ValueError, match="mask_ratio"):
        P.pretrain(pages, s, tmp_path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="masking"):
        P.pretrain(pages, settings(masking="nope"), tmp_path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="ink"):
        P.pretrain(pages[-1:], settings(), tmp_path, device="cpu", progress=False)


def test_a_world_that_does_not_give_the_planned_effective_batch_stops(pages, tmp_path):
    s = settings(epochs=1, max_windows=8)
    with pytest.raises(InputError, match=r"batch_size 4 x 1 processes = 4, but this run's effective batch is 8"):
        P.pretrain(pages, dict(s, batch_size=4, effective_batch_size=8), tmp_path / "run", device="cpu",
                   progress=False)


# -- 7. torchrun -----------------------------------------------------------------------------

def test_torchrun_world_size_one_on_cpu(pages, tmp_path):
    job = tmp_path / "inputs.json"
    job.write_text(json.dumps({"inputs": {"page_masks": list(pages)}, "settings": settings(epochs=1, max_windows=8),
                               "device": "cpu"}))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         "-m", "writer_retrieval.pretrain", "--job", str(job), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "backbone.pt").exists() and (out / "log.parquet").exists()
    assert "world size 1" in proc.stderr
    assert len(pd.read_parquet(out / "log.parquet")) == 1


# -- 8. devices --------------------------------------------------------------------------------

def test_resolve_device():
    assert P.resolve_device("cpu") == torch.device("cpu")
    assert P.resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError):
        P.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            P.resolve_device("cuda")


# -- 9. health signals -------------------------------------------------------------------------

def test_health_signals_are_logged_and_bounded(pages, tmp_path):
    import math

    s = settings(epochs=2, max_windows=8)
    P.pretrain(pages, s, tmp_path / "run", device="cpu", progress=False)
    log = pd.read_parquet(tmp_path / "run" / "log.parquet")
    assert np.allclose(log.uniform_entropy_cls, math.log(s["out_dim"]))
    assert ((0 <= log.teacher_entropy_cls) & (log.teacher_entropy_cls <= log.uniform_entropy_cls + 1e-5)).all()
    assert ((0 <= log.student_entropy_patch) & (log.student_entropy_patch <= log.uniform_entropy_patch + 1e-5)).all()
    assert (log.kl_cls > -1e-5).all() and (log.kl_patch > -1e-5).all()  # a KL is never negative
    assert ((0 < log.masked_share) & (log.masked_share < 1)).all() and (log.feature_std > 0).all()
    assert (log.center_norm > 0).all() and np.allclose(log.spread_feature_std, 32 ** -0.5)


def test_a_uniform_teacher_has_the_entropy_of_ln_out_dim():
    import math

    trainer = P.AttMaskTrainer(settings(), torch.device("cpu"), niter_per_epoch=1)
    trainer.teacher.last_global_cls = torch.randn(4, 32)
    out, pout = trainer.s["out_dim"], trainer.s["patch_out_dim"]
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :3] = True
    signals = trainer.health(torch.zeros(8, out), torch.zeros(12, pout), torch.zeros(4, out), torch.zeros(4, 16, pout),
                             mask, it=0)
    assert signals["teacher_entropy_cls"] == pytest.approx(math.log(out), abs=1e-5)
    assert signals["student_entropy_patch"] == pytest.approx(math.log(pout), abs=1e-5)
    assert signals["kl_patch"] == pytest.approx(0, abs=1e-6) and signals["masked_share"] == pytest.approx(3 / 16)
