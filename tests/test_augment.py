"""Batch augmentation on the trainer's device (augment_on: device): laws, OpenCV equivalence, seeds."""
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.ops  # noqa: F401  (imported at collection: no test pays torchvision's start-up)
from test_pretext import settings as pretext_settings
from test_pretrain import settings as attmask_settings

from writer_retrieval import pretrain as P
from writer_retrieval.errors import InputError
from writer_retrieval.pretrain.loop import seeded_generator
from writer_retrieval.imaging import write_mask
from writer_retrieval.pretrain import augment as A
from writer_retrieval.pretrain import pretext as T

AUG = {"seed": 0, "erode_p": 0.5, "dilate_p": 0.5, "blur_sigma": [0.1, 1.0], "augment_on": "device"}
CPU = torch.device("cpu")


def binary_windows(n=4, size=64, seed=0) -> torch.Tensor:
    return torch.from_numpy((np.random.default_rng(seed).random((n, size, size)) < 0.3).astype(np.uint8))


def test_crops_have_the_asked_shapes_dtype_and_range():
    for windows in (binary_windows(), binary_windows().float()):
        augmenter = A.BatchAugmenter(windows, AUG, 0, 0, CPU)
        crops = augmenter.crops(3, 32, [0.05, 0.4], 0.5)
        assert crops.shape == (4, 3, 1, 32, 32) and crops.dtype == torch.float32
        assert 0.0 <= crops.min() and crops.max() <= 1.0
        assert augmenter.crops(0, 16, [0.4, 1.0], 0.5).shape == (4, 0, 1, 16, 16)


def test_pooling_erosion_and_dilation_equal_opencv_3x3():
    img = binary_windows(1, 40)[0].numpy()
    kernel = np.ones((3, 3), np.uint8)
    variants = A.morphology_variants(torch.from_numpy(img)[None]).numpy()[:, 0]
    eroded, dilated = cv2.erode(img, kernel), cv2.dilate(img, kernel)
    np.testing.assert_array_equal(variants[0], img)
    np.testing.assert_array_equal(variants[1], eroded)
    np.testing.assert_array_equal(variants[2], dilated)
    np.testing.assert_array_equal(variants[3], cv2.dilate(eroded, kernel))  # erode first, as the workers do


def test_a_whole_window_crop_is_the_resized_window():
    plain = dict(AUG, erode_p=0.0, dilate_p=0.0)
    windows = binary_windows(2, 64)
    boxes = A.crop_boxes(seeded_generator(0, 0), 5, 64, 64, [1.0, 1.0], ratio=(1.0, 1.0))
    assert boxes.tolist() == [[0, 0, 64, 64]] * 5
    augmenter = A.BatchAugmenter(windows, plain, 0, 0, CPU)
    torch.testing.assert_close(augmenter.crops(1, 64, [1.0, 1.0], 0.0)[:, 0, 0], windows.float(), rtol=0, atol=0)
    half = augmenter.crops(1, 32, [1.0, 1.0], 0.0)[:, 0, 0].numpy()
    for got, window in zip(half, windows.float().numpy()):
        np.testing.assert_allclose(got, cv2.resize(window, (32, 32), interpolation=cv2.INTER_AREA), atol=1e-6)


def test_blur_is_opencvs_gaussian_per_sample():
    images = torch.rand(4, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.0, 0.3, 0.7, 1.0])
    blurred = A.gaussian_blur(images, sigma).numpy()
    np.testing.assert_array_equal(blurred[0, 0], images[0, 0].numpy())
    for i in range(1, 4):
        s = float(sigma[i])
        ref = cv2.GaussianBlur(images[i, 0].numpy(), (0, 0), sigmaX=s, sigmaY=s)
        np.testing.assert_allclose(blurred[i, 0], ref, atol=1e-5)


def test_crop_boxes_stay_inside_with_the_scale_and_ratio_law():
    top, left, h, w = A.crop_boxes(seeded_generator(1, 2), 2000, 256, 200, [0.05, 0.4]).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 256).all() and (left + w <= 200).all()
    area = h * w / (256 * 200)
    assert 0.04 < area.min() and area.max() < 0.41 and 0.2 < area.mean() < 0.25
    assert 0.7 < (w / h).min() and (w / h).max() < 1.4


def test_the_same_seed_iteration_and_rank_give_the_same_batch():
    windows = binary_windows(3, 48)

    def crops(it, rank):
        return A.BatchAugmenter(windows, AUG, it, rank, CPU).crops(2, 32, [0.4, 1.0], 0.5)

    assert torch.equal(crops(5, 0), crops(5, 0))
    assert not torch.equal(crops(5, 0), crops(6, 0)) and not torch.equal(crops(5, 0), crops(5, 1))
    with pytest.raises(InputError, match="augment_on"):
        A.on_device(dict(AUG, augment_on="gpu"))


@pytest.mark.parametrize("method", T.TASKS)
def test_pretext_batch_transform_equals_the_per_sample_one(method):
    s = T.settings_with_defaults(pretext_settings(method))
    task = T.PretextTask(method, s)
    images = torch.rand(6, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(6) % task.n_classes
    out = task.apply_batch(images, labels)
    for img, label, got in zip(images, labels, out):
        np.testing.assert_array_equal(got[0].numpy(), task.apply(img[0].numpy(), int(label)))


@pytest.fixture(scope="module")
def pages(tmp_path_factory, stroke_page):
    d = tmp_path_factory.mktemp("augment_pages")
    for i in range(2):
        write_mask(d / f"p{i}.png", stroke_page(i))
    return [str(d / f"p{i}.png") for i in range(2)]


@pytest.mark.parametrize("settings", [attmask_settings(epochs=1, max_windows=4, augment_on="device"),
                                      pretext_settings("jigsaw", batch_size=4, max_windows=4, augment_on="device")],
                         ids=["attmask", "jigsaw"])
def test_the_device_path_trains_a_step_on_cpu(pages, tmp_path, settings, one_torch_thread):
    out = P.pretrain(pages, settings, tmp_path, device="cpu", progress=False)
    log = pd.read_parquet(tmp_path / "log.parquet")
    assert out["samples_per_epoch"] == 4 and len(log) == 1 and np.isfinite(log.loss).all()
