"""AttMask objectives pinned on a tiny fixed batch against an independent numpy recomputation (DINO [CLS]
loss, iBOT masked-patch loss, centres, EMA), and the published recipe elements offered as settings."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from timm.layers import DropPath

from writer_retrieval import pretrain as P
from writer_retrieval.config import load_schema, validate_config
from writer_retrieval.errors import InputError
from writer_retrieval.pretrain.loop import Optimization

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}
B, V, L = 3, 2, 2          # images, global views, local crops
NITER = 2                   # iterations per epoch
# The paper's values (Raven et al. via methods.md; where it is silent, the AttMask code and training commands).
PAPER = {"drop_path": 0.1, "freeze_last_layer": 1, "shared_head": True, "warmup_teacher_temp": 0.04,
         "warmup_patch_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 30, "mask_ratio_var": 0.2,
         "clip_mode": "per_parameter"}


def settings(**over):
    s = dict(method="attmask", model=dict(TINY), epochs=4, batch_size=B, lr=0.01, min_lr=1e-6, warmup_epochs=0,
             weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, momentum_teacher=0.9, teacher_temp=0.06,
             student_temp=0.1, patch_teacher_temp=0.07, out_dim=8, patch_out_dim=8, masking="attmask_high",
             mask_ratio=0.3, mask_probability=0.5, global_size=32, local_size=16, n_local_crops=L,
             global_scale=[0.4, 1.0], local_scale=[0.05, 0.4], window=32, max_windows=0, seed=0, num_workers=0,
             amp="none", head_hidden_dim=16, head_bottleneck_dim=8, center_momentum=0.8,
             warmup_teacher_temp=0.02, warmup_patch_teacher_temp=0.03, warmup_teacher_temp_epochs=3)
    s.update(over)
    return s


def trainer(**over):
    return P.AttMaskTrainer(settings(**over), torch.device("cpu"), niter_per_epoch=NITER)


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    return ((torch.rand(B, V, 1, 32, 32, generator=g) > 0.7).float(),
            (torch.rand(B, L, 1, 16, 16, generator=g) > 0.7).float())


def view_major(x):
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


def random_centres(tr):
    g = torch.Generator().manual_seed(1)
    tr.center.copy_(torch.randn(tr.center.shape, generator=g) * 0.3)
    tr.patch_center.copy_(torch.randn(tr.patch_center.shape, generator=g) * 0.3)


# -- numpy references (float64) -----------------------------------------------------------------

def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def softmax(x):
    return np.exp(log_softmax(x))


def teacher_temp(warm, final, warm_epochs, it):
    """Linear over the warm-up epochs (epoch 0 = warm, epoch warm_epochs - 1 = final), constant in an epoch."""
    epoch = it // NITER
    return final if epoch >= warm_epochs - 1 else warm + (final - warm) * epoch / (warm_epochs - 1)


def dino_cls_loss(s_cls, t_cls, center, tt, st):
    """Teacher softmax((t - c) / tt) of each global view against the student log-softmax(s / st) of every
    other view (global or local), cross-entropy averaged over images, then over the pairs."""
    t = softmax((t_cls - center) / tt).reshape(V, B, -1)
    s = log_softmax(s_cls / st).reshape(-1, B, t.shape[-1])
    return np.mean([-(t[q] * s[v]).sum(-1).mean() for q in range(V) for v in range(len(s)) if v != q])


def ibot_patch_loss(s_masked, t_patch, mask, patch_center, ptt, st):
    """Per image the mean cross-entropy over its masked patches (0 without any), mean over all images."""
    t = softmax((t_patch - patch_center) / ptt)
    s = log_softmax(s_masked / st)
    per_image = np.zeros(len(mask))
    for row, (i, p) in enumerate(np.argwhere(mask)):
        per_image[i] += -(t[i, p] * s[row]).sum() / mask[i].sum()
    return per_image.mean()


def np64(*tensors):
    return [t.detach().double().numpy() for t in tensors]


# -- the objectives --------------------------------------------------------------------------------

def test_losses_match_the_numpy_recomputation_through_the_temperature_warm_up():
    tr = trainer()
    random_centres(tr)
    g, loc = (view_major(x) for x in fixed_batch())
    mask = torch.zeros(V * B, 16, dtype=torch.bool)
    mask[0, [1, 5, 6]] = True
    mask[2, 0] = True
    mask[4, :8] = True  # images 1, 3 and 5 without masked patches
    with torch.no_grad():
        t_cls, t_patch, _ = tr.teacher(g)
        s_cls, s_patch, _ = tr.student(g, loc, mask)
    assert s_cls.shape == ((V + L) * B, 8) and s_patch.shape == (mask.sum(), 8) and t_patch.shape == (V * B, 16, 8)
    c, pc, *outs = np64(tr.center, tr.patch_center, s_cls, s_patch, t_cls, t_patch)
    for it in (0, 1, 3, 5, 7):  # epochs 0, 0, 1, 2, 3 of a 3-epoch warm-up
        tt, ptt = teacher_temp(0.02, 0.06, 3, it), teacher_temp(0.03, 0.07, 3, it)
        np.testing.assert_allclose(tr.temperatures(it), (tt, ptt), rtol=1e-12)
        loss_cls, loss_patch = tr.loss(s_cls, s_patch, t_cls, t_patch, mask, V, it)
        np.testing.assert_allclose(loss_cls.item(), dino_cls_loss(outs[0], outs[2], c, tt, 0.1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(loss_patch.item(), ibot_patch_loss(outs[1], outs[3], mask.numpy(), pc, ptt, 0.1),
                                   rtol=1e-5, atol=1e-6)


def capture_forward_outputs(tr):
    seen = {}
    tr.teacher.register_forward_hook(lambda mod, args, out: seen.update(teacher=out))
    tr.student.register_forward_hook(lambda mod, args, out: seen.update(student=out, mask=args[2]))
    return seen


def test_a_step_updates_centres_and_teacher_as_published_and_trains_the_student_only():
    tr = trainer()
    tr.train_mode()
    random_centres(tr)
    seen = capture_forward_outputs(tr)
    c0, pc0 = np64(tr.center, tr.patch_center)
    teacher0 = copy.deepcopy(tr.teacher)
    it = 3
    out = tr.step(fixed_batch(), it, epoch=it // NITER)
    (t_cls, t_patch, _), (s_cls, s_patch, _), mask = seen["teacher"], seen["student"], seen["mask"].numpy()
    assert 0 < mask.any(1).sum() < V * B  # masked and unmasked images
    s_cls, s_patch, t_cls, t_patch = np64(s_cls, s_patch, t_cls, t_patch)
    tt, ptt = teacher_temp(0.02, 0.06, 3, it), teacher_temp(0.03, 0.07, 3, it)
    np.testing.assert_allclose(out["loss_cls"], dino_cls_loss(s_cls, t_cls, c0, tt, 0.1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["loss_patch"], ibot_patch_loss(s_patch, t_patch, mask, pc0, ptt, 0.1),
                               rtol=1e-5, atol=1e-6)
    # centres: EMA (momentum 0.8) of the batch mean; the patch centre of the mean over patches
    np.testing.assert_allclose(tr.center.numpy(), 0.8 * c0 + 0.2 * t_cls.mean(0, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(tr.patch_center.numpy(), 0.8 * pc0 + 0.2 * t_patch.mean(1).mean(0, keepdims=True),
                               atol=1e-6)
    # teacher = m * teacher + (1 - m) * updated student, m on the cosine schedule 0.9 -> 1
    m = 1 - 0.1 * (np.cos(np.pi * it / (4 * NITER)) + 1) / 2
    assert out["momentum"] == pytest.approx(m, abs=1e-12)
    for (name, t1), t0, s1 in zip(tr.teacher.named_parameters(), teacher0.parameters(), tr.student.parameters()):
        assert not t1.requires_grad and t1.grad is None, name
        torch.testing.assert_close(t1, m * t0 + (1 - m) * s1, rtol=0, atol=1e-6)
    grads = {n: p.grad for n, p in tr.student.named_parameters()}
    assert all(p.requires_grad for p in tr.student.parameters())
    assert [n for n, g in grads.items() if g is None] == []
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


# -- recipe elements as settings ---------------------------------------------------------------------

def test_freeze_last_layer_keeps_the_last_layers_in_the_first_epochs():
    tr = trainer(freeze_last_layer=1, mask_probability=1.0)
    last = [tr.student.head.last_cls.weight, tr.student.head.last_patch.weight]
    before = [p.detach().clone() for p in last]
    mlp = tr.student.head.mlp[0].weight.detach().clone()
    tr.step(fixed_batch(), 0, epoch=0)
    assert all(torch.equal(p, q) for p, q in zip(last, before))
    assert not torch.equal(tr.student.head.mlp[0].weight, mlp)  # the rest trains
    tr.step(fixed_batch(), NITER, epoch=1)
    assert not any(torch.equal(p, q) for p, q in zip(last, before))


def test_drop_path_is_in_the_student_only_and_the_export_loads_without_it(tmp_path):
    model = dict(TINY, depth=2)
    tr = trainer(model=model, drop_path=0.1)
    first, last = tr.student.backbone.blocks
    # stochastic depth rises linearly to drop_path in the last block (0 in the first: timm uses Identity)
    assert isinstance(first.drop_path1, torch.nn.Identity) and isinstance(last.drop_path1, DropPath)
    assert last.drop_path1.drop_prob == last.drop_path2.drop_prob == pytest.approx(0.1)
    assert all(isinstance(b.drop_path1, torch.nn.Identity) and isinstance(b.drop_path2, torch.nn.Identity)
               for b in tr.teacher.backbone.blocks)
    torch.save(tr.export(), tmp_path / "backbone.pt")
    net = P.load_backbone(tmp_path / "backbone.pt", model)
    x = view_major(fixed_batch()[0])
    with torch.no_grad():
        torch.testing.assert_close(P.forward_tokens(net, x), P.forward_tokens(tr.student.backbone.eval(), x))


def test_a_shared_head_has_one_last_layer_for_cls_and_patches():
    tr = trainer(shared_head=True, mask_probability=1.0)
    for net in (tr.student, tr.teacher):
        assert net.head.last_patch is net.head.last_cls
    tr.step(fixed_batch(), NITER, epoch=1)
    torch.testing.assert_close(tr.student.head.last_patch.weight, tr.student.head.last_cls.weight, rtol=0, atol=0)
    separate = trainer(shared_head=False)
    assert separate.student.head.last_patch is not separate.student.head.last_cls
    with pytest.raises(InputError, match="shared_head needs patch_out_dim == out_dim, got 4 and 8"):
        trainer(shared_head=True, patch_out_dim=4)


@pytest.mark.parametrize("masking", ["random", "attmask_high"])
def test_the_mask_ratio_varies_per_iteration_within_its_range(masking):
    tr = trainer(masking=masking, mask_probability=1.0, mask_ratio=0.3, mask_ratio_var=0.2)
    attention = torch.rand(V * B, 16, generator=torch.Generator().manual_seed(2))
    counts = []
    for it in range(40):
        per_image = tr.make_mask(V * B, (4, 4), attention, it).sum(1)
        assert len(set(per_image.tolist())) == 1  # one ratio for the whole batch
        counts.append(int(per_image[0]))
    assert P.n_masked(16, 0.1) <= min(counts) < max(counts) <= P.n_masked(16, 0.5)
    assert len(set(counts)) >= 3
    fixed = trainer(masking=masking, mask_probability=1.0)  # the library default: no variation
    assert {int(fixed.make_mask(V * B, (4, 4), attention, it).sum()) for it in range(5)} == {V * B * 5}


def test_per_parameter_clipping_bounds_every_parameter_gradient_norm():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 1))
    s = dict(epochs=1, batch_size=256, lr=0.0, min_lr=0.0, warmup_epochs=0, weight_decay=0.0, clip_grad=0.5)
    x = torch.randn(8, 6)
    norms = {}
    for mode in ("per_parameter", "global"):
        opt = Optimization(net, dict(s, clip_mode=mode), 1, torch.device("cpu"))
        opt.step((net(x) * 100).sum(), 0, lambda: norms.update({mode: [p.grad.norm().item() for p in net.parameters()]}))
    per, glob = np.array(norms["per_parameter"]), np.array(norms["global"])
    assert (per <= 0.5 + 1e-5).all() and (per > 0.49).all()  # every gradient here was above the clip
    assert np.sqrt((glob ** 2).sum()) == pytest.approx(0.5, rel=1e-4) and (glob < 0.5).all()
    with pytest.raises(ValueError, match="clip_mode"):
        Optimization(net, dict(s, clip_mode="nope"), 1, torch.device("cpu"))


def test_the_schema_defaults_and_the_gpu_presets_give_the_paper_values():
    schema = load_schema()  # loaded once: validating six configs stays fast
    cfg = validate_config({"datasets": {"d": {"adapter": "synthetic"}}, "experiments": [{"dataset": "d"}],
                           "features": {"a": {"kind": "vit", "model": {"arch": "vit_small_patch16_224"},
                                              "pretrain": {"method": "attmask"}}}}, schema)
    pretrain = cfg["features"]["a"]["pretrain"]
    assert {k: pretrain[k] for k in PAPER} == PAPER
    root = Path(__file__).parent.parent / "configs"
    for name in ("icdar2017", "icdar2019", "cvl", "hisfrag20", "benchmark-icdar2017"):
        raw = yaml.safe_load((root / f"{name}.yaml").read_text())
        for dataset in raw["datasets"].values():
            dataset["root"] = "/data/root"  # the user supplies it
        validate_config(raw, schema)
        for feat in raw["features"].values():
            if feat.get("pretrain", {}).get("method") == "attmask":
                assert {k: feat["pretrain"].get(k) for k in PAPER} == PAPER, name
