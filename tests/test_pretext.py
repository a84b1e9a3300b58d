"""Spatial-context pretext tasks: labels of known transformations, permutation sets, training."""
import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from writer_retrieval.errors import InputError
from writer_retrieval.imaging import write_mask
from writer_retrieval.pretrain import load_backbone, pretrain
from writer_retrieval.pretrain import pretext as T

TINY = {"arch": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2,
        "num_heads": 2}


def settings(method="flip", **kw):
    s = {"method": method, "model": TINY, "epochs": 1, "batch_size": 8, "lr": 0.002, "min_lr": 1e-6,
         "warmup_epochs": 0, "weight_decay": 0.04, "weight_decay_end": 0.04, "clip_grad": 3.0, "crop_size": 64,
         "crop_scale": [0.6, 1.0], "window": 96, "max_windows": 0, "seed": 0, "num_workers": 0, "amp": "none"}
    s.update(kw)
    return s


# A 4x4 image whose every pixel is distinct: transformations can be read off exactly.
IMG = np.arange(16, dtype=np.float32).reshape(4, 4)


def test_flip_labels():
    task = T.PretextTask("flip", T.settings_with_defaults(settings()))
    assert task.n_classes == 3
    np.testing.assert_array_equal(task.apply(IMG, 0), IMG)
    np.testing.assert_array_equal(task.apply(IMG, 1)[0], [3, 2, 1, 0])          # mirrored left-right
    np.testing.assert_array_equal(task.apply(IMG, 2)[:, 0], [12, 8, 4, 0])      # upside down


def test_rotation_labels():
    task = T.PretextTask("rotation", T.settings_with_defaults(settings("rotation")))
    assert task.n_classes == 4
    for k in range(4):
        out = task.apply(IMG, k)
        # Undoing k quarter turns counter-clockwise gives the input back; no other k does.
        np.testing.assert_array_equal(np.rot90(out, -k), IMG)
    assert task.apply(IMG, 1)[0, 0] == 3  # top-right corner moves to the top-left
    with pytest.raises(ValueError, match="label 4"):
        task.apply(IMG, 4)


def test_jigsaw_labels_are_the_permutation_of_tiles():
    task = T.PretextTask("jigsaw", T.settings_with_defaults(settings("jigsaw", jigsaw_grid=2)))
    assert task.n_classes == 24 and len({tuple(p) for p in task.perms}) == 24
    tiles = [IMG[:2, :2], IMG[:2, 2:], IMG[2:, :2], IMG[2:, 2:]]
    for label in (0, 5, 23):
        out = task.apply(IMG, label)
        perm = task.perms[label]
        got = [out[:2, :2], out[:2, 2:], out[2:, :2], out[2:, 2:]]
        for j in range(4):
            np.testing.assert_array_equal(got[j], tiles[perm[j]])
    np.testing.assert_array_equal(task.apply(IMG, 0), IMG)  # label 0 = identity


def test_sorting_shuffles_strips_along_the_writing_direction():
    task = T.PretextTask("sorting", T.settings_with_defaults(settings("sorting", sorting_strips=4)))
    assert task.n_classes == 24
    label = 7
    perm = task.perms[label]
    out = task.apply(IMG, label)
    for j in range(4):  # strip j of the output = column perm[j] of the input; rows untouched
        np.testing.assert_array_equal(out[:, j], IMG[:, perm[j]])
    # Sorting the strips back by the predicted permutation restores the image.
    restored = np.empty_like(out)
    restored[:, perm] = out
    np.testing.assert_array_equal(restored, IMG)


def test_permutation_sets():
    assert T.permutation_set(3, 100).tolist() == [list(p) for p in itertools.permutations(range(3))]
    subset = T.permutation_set(9, 10, seed=0)
    assert subset.shape == (10, 9) and subset[0].tolist() == list(range(9))
    assert len({tuple(p) for p in subset}) == 10
    # Far apart: every pair differs in most positions (a random pair differs in ~8 of 9 on average).
    dists = [(a != b).sum() for a, b in itertools.combinations(subset, 2)]
    assert min(dists) >= 8
    assert np.array_equal(subset, T.permutation_set(9, 10, seed=0))


def test_tiles_must_divide_the_crop():
    with pytest.raises(InputError, match="does not split"):
        T.tile_grid((64, 64), "sorting", settings(sorting_strips=3))
    with pytest.raises(InputError, match="not a pretext task"):
        T.settings_with_defaults(settings("attmask"))
    with pytest.raises(InputError, match="multiple of patch_size"):
        T.settings_with_defaults(settings(crop_size=60))


@pytest.fixture(scope="module")
def pages(tmp_path_factory, stroke_page):
    d = tmp_path_factory.mktemp("pretext_pages")
    paths = []
    for i in range(2):
        write_mask(d / f"p{i}.png", stroke_page(i))
        paths.append(str(d / f"p{i}.png"))
    return paths


@pytest.mark.parametrize("method", T.TASKS)
def test_dataset_labels_match_the_applied_transformation(pages, method):
    from writer_retrieval.pretrain.loop import page_windows

    s = T.settings_with_defaults(settings(method))
    task = T.PretextTask(method, s)
    pgs, index = page_windows(pages, s, progress=False)
    ds = T.PretextDataset(pgs, index, s, task)
    for i in range(4):
        img, label = ds[i]
        # Re-draw the same crop with the same per-sample RNG, apply the label: identical input.
        rng = ds.rng_for(i)
        crop = ds.crop(rng, ds.window_at(i), s["crop_size"], s["crop_scale"], s["blur_p"])
        assert int(label) == int(rng.integers(task.n_classes))
        np.testing.assert_array_equal(img[0].numpy(), task.apply(crop, int(label)))


def test_loss_decreases_on_a_fixed_batch(pages):
    from writer_retrieval.pretrain.loop import page_windows

    s = T.settings_with_defaults(settings("rotation", lr=0.01, clip_grad=0.0))
    task = T.PretextTask("rotation", s)
    pgs, index = page_windows(pages, s, progress=False)
    ds = T.PretextDataset(pgs, index, s, task)
    items = [ds[i] for i in range(8)]
    batch = (torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))
    torch.manual_seed(0)
    trainer = T.PretextTrainer(s, task.n_classes, torch.device("cpu"), niter_per_epoch=100)
    losses = [trainer.step(batch, i, 0)["loss"] for i in range(15)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[0] == pytest.approx(math.log(4), rel=0.35)  # starts near chance


def test_pretrain_pretext_writes_a_loadable_backbone_and_resumes(pages, tmp_path):
    s = settings("jigsaw", epochs=2)
    full = pretrain(pages, s, tmp_path / "A", device="cpu", progress=False)
    assert full["epochs"] == 2 and set(full) >= {"loss", "accuracy"}
    log = pd.read_parquet(tmp_path / "A" / "log.parquet")
    assert list(log.columns[:3]) == ["epoch", "loss", "accuracy"] and len(log) == 2
    assert log.chance.tolist() == [1 / 24] * 2  # jigsaw on 2 x 2 tiles: 24 permutations
    stopped = pretrain(pages, s, tmp_path / "B", device="cpu", progress=False, stop_after_epochs=1)
    assert stopped["stopped"]
    pretrain(pages, s, tmp_path / "B", device="cpu", progress=False)
    a = load_backbone(tmp_path / "A" / "backbone.pt", TINY)
    b = load_backbone(tmp_path / "B" / "backbone.pt", TINY)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
