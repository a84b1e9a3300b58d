"""Image input/output shared by every stage.

Conventions (see docs/development.md, "Conventions"):
- Pages are loaded as 8-bit grayscale numpy arrays (0 = black, 255 = white).
- Ink masks are boolean arrays with ink = True, stored as 1-bit PNG where ink = 1 (white).
- Every file is written atomically: to a temporary name in the same folder, then renamed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .storage import atomic_path

# Pages of competition datasets exceed PIL's decompression-bomb guard (178 Mpx is rare but
# 30 Mpx scans are common and trip the warning); the guard protects web servers, not us.
Image.MAX_IMAGE_PIXELS = None

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".pgm", ".ppm", ".pbm"}

# Modes PIL can hand us that we convert to 8-bit gray. Anything else is "unsupported mode".
_SUPPORTED_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                    "I;16", "I;16L", "I;16B", "I;16N", "I", "La", "RGBa"}


class BadImageError(InputError):
    """An input image that cannot be used; the message is the rejection reason."""


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a boolean ink mask (ink = True) as a 1-bit PNG with ink = 1."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"{path}: an ink mask must be 2-D, got shape {mask.shape}")
    with atomic_path(path, ".png") as tmp:
        Image.fromarray(mask).save(tmp, format="PNG", optimize=False)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read an ink mask written by `write_mask` (any nonzero pixel is ink)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0


def write_gray(path: str | os.PathLike, image: np.ndarray, jpeg_quality: int | None = None) -> None:
    """Write an 8-bit gray or RGB image atomically; format from the suffix."""
    path = Path(path)
    params = {}
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: cannot write images with suffix {path.suffix!r} (use .jpg, .png or .tif)")
    if fmt == "JPEG":
        params = {"quality": int(jpeg_quality or 90), "subsampling": 0}
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format=fmt, **params)


def _check_complete(path: Path, data_tail: bytes, size: int) -> None:
    """Catch truncated files that decoders accept with only a warning."""
    if size == 0:
        raise BadImageError("zero bytes")
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        # A complete JPEG ends with the EOI marker; some writers pad after it with zeros.
        if b"\xff\xd9" not in data_tail.rstrip(b"\x00\r\n "):
            raise BadImageError("truncated (JPEG end-of-image marker missing)")
    elif suffix == ".png":
        if b"IEND" not in data_tail:
            raise BadImageError("truncated (PNG IEND chunk missing)")


def _to_gray8(arr: np.ndarray, mode: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return np.where(arr, 255, 0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        hi = int(arr.max()) if arr.size else 0
        if int(arr.min(initial=0)) < 0 or hi >= 2**16:
            raise BadImageError(f"unsupported mode ({mode} with values outside 0..65535)")
        # Scale by the bit depth the data actually uses: 10/12/14-bit scanners store into 16 bits.
        bits = next(b for b in (8, 10, 12, 14, 16) if hi < 2**b)
        return np.round(arr.astype(np.float64) * (255.0 / (2**bits - 1))).astype(np.uint8)
    raise BadImageError(f"unsupported mode ({mode}, dtype {arr.dtype})")


def load_gray(path: str | os.PathLike) -> np.ndarray:
    """Load any common image (8/16-bit gray, RGB, RGBA, palette; PNG, JPEG, TIFF, ...) as 8-bit gray.

    The EXIF orientation is applied (the page comes out upright, as viewers show it), and
    transparent pixels are composited onto white paper. Raises BadImageError with the
    rejection reason for zero-byte, truncated, unreadable or unsupported files.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            if size > 64:
                fh.seek(size - 64)
            tail = fh.read()
    except OSError as exc:
        raise BadImageError(f"unreadable ({exc.strerror or exc})") from exc
    _check_complete(path, tail, size)
    try:
        with Image.open(path) as im:
            im.load()
            # Phone and camera scans store pages rotated with an EXIF orientation tag; without it
            # the features would see sideways writing and the index would record swapped sizes.
            ImageOps.exif_transpose(im, in_place=True)
            mode = im.mode
            if mode not in _SUPPORTED_MODES:
                raise BadImageError(f"unsupported mode ({mode})")
            if mode in ("P", "PA"):
                im = im.convert("RGBA")
                mode = "RGBA"
            if mode in ("LA", "La", "RGBA", "RGBa", "PA"):
                rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
                alpha = rgba[..., 3:4] / 255.0
                rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
                gray = rgb @ np.array([0.299, 0.587, 0.114])
                return np.clip(np.round(gray), 0, 255).astype(np.uint8)
            if mode in ("1", "L"):
                return _to_gray8(np.asarray(im), mode)
            if mode.startswith("I"):
                return _to_gray8(np.asarray(im), mode)
            return np.asarray(im.convert("L"))
    except BadImageError:
        raise
    except UnidentifiedImageError as exc:
        raise BadImageError("unreadable (not an image format we can decode)") from exc
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg.lower():
            raise BadImageError(f"truncated ({msg})") from exc
        raise BadImageError(f"unreadable ({msg})") from exc
    except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"unreadable ({exc})") from exc
