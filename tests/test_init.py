"""pretrain.init: a run starts from (method none: uses as it is) a local checkpoint, checked against the model."""
import shutil

import pytest
import torch

from writer_retrieval import pretrain as P
from writer_retrieval.config import ConfigError, validate_config
from writer_retrieval.errors import InputError
from writer_retrieval.plan import Plan
from writer_retrieval.pretrain.attmask import AttMaskTrainer
from writer_retrieval.pretrain.saghog import build_encoder, load_encoder, model_with_defaults
from writer_retrieval.vit import build_backbone, load_backbone

TINY = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 16, "embed_dim": 16, "depth": 1,
        "num_heads": 2}
SAGHOG = {"embed_dim": 16, "depth": 1, "num_heads": 2, "decoder_dim": 8, "decoder_heads": 2}


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "zoo.pt"
    torch.save(build_backbone(TINY, seed=7).state_dict(), path)
    return path


def test_a_checkpoint_of_another_architecture_is_named_with_its_mismatch(checkpoint, tmp_path):
    deeper = {**TINY, "depth": 2}
    with pytest.raises(InputError, match=r"zoo\.pt does not fit the model settings: missing blocks\.1\."):
        build_backbone(deeper, init=checkpoint)
    wider = {**TINY, "embed_dim": 32}
    with pytest.raises(InputError, match=r"shape of cls_token \(1, 1, 16\) where the model has \(1, 1, 32\)"):
        build_backbone(wider, init=checkpoint)
    with pytest.raises(InputError, match="missing.pt: no such file"):
        build_backbone(TINY, init=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt: not a PyTorch state_dict"):
        build_backbone(TINY, init=tmp_path / "junk.pt")


def test_method_none_uses_the_checkpoint_as_it_is(checkpoint, tmp_path):
    settings = {"method": "none", "kind": "vit", "model": TINY, "init": str(checkpoint)}
    P.run({}, settings, tmp_path / "out")
    loaded = load_backbone(tmp_path / "out" / "backbone.pt", TINY)
    reference = build_backbone(TINY, seed=7)
    for (k, a), b in zip(loaded.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k
    encoder = tmp_path / "encoder.pt"
    torch.save(build_encoder(model_with_defaults(SAGHOG), seed=3).state_dict(), encoder)
    P.run({}, {"method": "none", "kind": "saghog", "model": SAGHOG, "init": str(encoder)}, tmp_path / "sag")
    loaded = load_encoder(tmp_path / "sag" / "backbone.pt", SAGHOG)
    assert torch.equal(loaded.patch_embed.proj.weight, build_encoder(model_with_defaults(SAGHOG), seed=3).patch_embed.proj.weight)


def test_training_starts_from_the_checkpoint(checkpoint):
    s = dict(method="attmask", model=TINY, epochs=1, batch_size=2, lr=1e-3, min_lr=0, warmup_epochs=0,
             weight_decay=0.04, weight_decay_end=0.04, clip_grad=0, momentum_teacher=0.99, teacher_temp=0.04,
             student_temp=0.1, patch_teacher_temp=0.07, out_dim=8, patch_out_dim=8, masking="random",
             mask_ratio=0.3, mask_probability=0.5, global_size=32, local_size=16, n_local_crops=0,
             global_scale=[0.4, 1], local_scale=[0.1, 0.4], window=64, max_windows=0, seed=0, num_workers=0,
             amp="none", head_hidden_dim=16, head_bottleneck_dim=8, init=str(checkpoint))
    trainer = AttMaskTrainer(s, torch.device("cpu"), niter_per_epoch=1)
    start = torch.load(checkpoint, weights_only=True)
    for net in (trainer.student, trainer.teacher):
        assert torch.equal(net.backbone.pos_embed, start["pos_embed"])


def _config(init: str, kind: str = "vit") -> dict:
    feature = ({"kind": "vit", "model": TINY, "pretrain": {"method": "none", "init": init}} if kind == "vit" else
               {"kind": "saghog", "model": SAGHOG, "pretrain": {"method": "none", "init": init}})
    return validate_config({"datasets": {"d": {"adapter": "synthetic", "writers": 4, "train_writers": 2}},
                            "features": {"zoo": feature}, "experiments": [{"dataset": "d", "features": ["zoo"]}]})


def test_the_plan_hashes_the_checkpoint_content_not_its_path(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    variant = Plan(_config(str(checkpoint))).of_feature("pretrain", "d", "zoo")
    assert variant.result["init"].startswith("sha256:") and variant.execution["init"] == str(checkpoint)
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(checkpoint, moved)
    assert Plan(_config(str(moved))).of_feature("pretrain", "d", "zoo").folder == variant.folder
    torch.save(build_backbone(TINY, seed=8).state_dict(), moved)
    assert Plan(_config(str(moved))).of_feature("pretrain", "d", "zoo").folder != variant.folder
    with pytest.raises(ConfigError, match=r"features\.zoo\.pretrain\.init: checkpoint 'gone\.pt' does not exist"):
        Plan(_config("gone.pt"))
