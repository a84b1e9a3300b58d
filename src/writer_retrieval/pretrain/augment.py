"""Augmentation of a whole batch of windows on its device (`augment_on: device`).

With `augment_on: workers` (the default) every sample is cropped and augmented with OpenCV in the
data-loader workers (loop.WindowDataset.crop). With `device` the datasets hand over the raw
windows and the trainer augments the batch with torch ops before the forward pass, so that a GPU
is not starved by CPU workers. The laws are those of the workers' path:

- random resized crop (torchvision's law, `random_resized_crop_box`: 10 tries, then a centre
  crop), resized by torchvision's roi_align: the mean of ceil(crop / size) bilinear samples per
  output pixel (INTER_AREA when shrinking by a whole factor, INTER_LINEAR when enlarging);
- 3x3 erosion / dilation as min / max pooling (cv2.erode / cv2.dilate on binary windows), each
  with its probability per crop, applied to the whole window before cropping (the crop border
  sees the window's neighbouring pixels instead of a replicated border);
- Gaussian blur with a per-crop sigma, cv2.GaussianBlur's kernel for float images (radius
  round(8 sigma + 1) | 1 // 2, reflect-101 border) as a separable depthwise convolution.

Randomness: a CPU torch.Generator seeded by (seed, iteration, rank), so a batch's augmentation
does not depend on the device, and a resumed run draws the same as an uninterrupted one.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .loop import centre_box, dilate, erode, seeded_generator

MODES = ("workers", "device")
# Stream tag of the augmentation's seed, apart from the masks' (seed, iteration, rank, 2).
STREAM = 3


def on_device(s: dict) -> bool:
    """True when the settings' `augment_on` asks for the batch path."""
    mode = s["augment_on"]
    if mode not in MODES:
        raise InputError(f"pretrain settings: augment_on {mode!r} not in {', '.join(MODES)}")
    return mode == "device"


def morphology_variants(windows: torch.Tensor) -> torch.Tensor:
    """Windows [B, H, W] or [B, 1, H, W] (uint8 or float) -> float32 [4B, 1, H, W]: window b as is,
    eroded, dilated, eroded then dilated at rows 4b + erode + 2 * dilate."""
    x = windows.reshape(-1, 1, *windows.shape[-2:]).float()
    eroded = erode(x)
    return torch.stack([x, eroded, dilate(x), dilate(eroded)], dim=1).flatten(0, 1)


def crop_boxes(generator: torch.Generator, n: int, height: int, width: int, scale,
               ratio=(3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """[n, 4] float64 (top, left, h, w): `random_resized_crop_box`'s law, drawn for n crops at once."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=generator, dtype=torch.float64))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    ar = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, tries, generator=generator, dtype=torch.float64))
    w, h = torch.round(torch.sqrt(target * ar)), torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.int8).argmax(1, keepdim=True)  # the first try that fits, as the loop takes it
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top, left = torch.floor(u[:, 0] * (height - h + 1)), torch.floor(u[:, 1] * (width - w + 1))
    boxes = torch.stack([top, left, h, w], 1)
    boxes[~ok.any(1)] = torch.tensor(centre_box(height, width, ratio), dtype=torch.float64)
    return boxes


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur image i of [N, 1, H, W] with sigma[i] (0 = unchanged): cv2.GaussianBlur(img, (0, 0), sigma)."""
    n = images.shape[0]
    radius = torch.div(torch.round(8 * sigma + 1).long() | 1, 2, rounding_mode="floor")  # cv2's float kernel size
    r_max = int(radius.max()) if n else 0
    if r_max == 0:
        return images
    taps = torch.arange(-r_max, r_max + 1, device=images.device, dtype=images.dtype)
    s = sigma.to(images.device, images.dtype).clamp_min(1e-6)[:, None]
    kernel = torch.exp(-taps ** 2 / (2 * s ** 2)) * (taps.abs() <= radius.to(images.device)[:, None])
    kernel = kernel / kernel.sum(1, keepdim=True)  # [N, 2R + 1]
    x = F.pad(images.reshape(1, n, *images.shape[-2:]), (r_max, r_max, r_max, r_max), mode="reflect")
    x = F.conv2d(x, kernel[:, None, None, :], groups=n)
    x = F.conv2d(x, kernel[:, None, :, None], groups=n)
    return x.reshape(images.shape)


class BatchAugmenter:
    """The augmented crops of one batch of raw windows [B, H, W] on `device`, drawn from the
    generator of (seed, iteration, rank); call `crops` once per crop kind, in a fixed order."""

    def __init__(self, windows: torch.Tensor, s: dict, iteration: int, rank: int, device: torch.device):
        self.s = s
        self.generator = seeded_generator(s["seed"], iteration, rank, STREAM)
        self.variants = morphology_variants(windows.to(device, non_blocking=device.type == "cuda"))

    def crops(self, n_crops: int, size: int, scale, blur_p: float) -> torch.Tensor:
        """[B, n_crops, 1, size, size] float32 in [0, 1]: random resized crop, erosion / dilation, blur."""
        from torchvision.ops import roi_align

        s, g = self.s, self.generator
        n_windows, _, height, width = self.variants.shape
        batch = n_windows // 4
        n = batch * int(n_crops)
        if n == 0:
            return self.variants.new_zeros(batch, 0, 1, size, size)
        top, left, h, w = crop_boxes(g, n, height, width, scale).unbind(1)
        erode_ = torch.rand(n, generator=g) < float(s["erode_p"])
        dilate_ = torch.rand(n, generator=g) < float(s["dilate_p"])
        lo, hi = (float(v) for v in s["blur_sigma"])
        blurred = torch.rand(n, generator=g) < float(blur_p)
        sigma = torch.where(blurred, lo + (hi - lo) * torch.rand(n, generator=g), 0.0)
        source = torch.arange(batch).repeat_interleave(int(n_crops)) * 4 + erode_.long() + 2 * dilate_.long()
        boxes = torch.stack([source.double(), left, top, left + w, top + h], 1).to(self.variants)
        out = roi_align(self.variants, boxes, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        return gaussian_blur(out, sigma).clamp_(0.0, 1.0).reshape(batch, int(n_crops), 1, size, size)
