"""Robust decoding of untrusted image bytes to RGB uint8. Never raises on data.

    image_id(data)                          -> hex sha256 of the bytes (the project's image id)
    decode_image(data, max_pixels, min_side) -> Decoded(status, error, image, width, height)

Order of checks: empty -> header (format, declared size) -> pixel limit / minimum side ->
full decode -> EXIF orientation -> conversion to RGB. The pixel limit is checked on the size
declared in the header, before any pixel data is decompressed (decompression bombs).

Conversions: CMYK/YCbCr/LAB/HSV -> RGB (through the embedded ICC profile when there is one),
grayscale and 1-bit -> RGB, palette -> RGB (transparency honoured), 16/32-bit integer and float
grayscale scaled to 8 bits (not clipped), alpha composited over a white background.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MIN_SIDE = 32

STATUS_OK = "ok"
STATUS_DECODE_ERROR = "decode_error"
STATUS_TOO_LARGE = "too_large"
STATUS_TOO_SMALL = "too_small"

@dataclass
class Decoded:
    status: str
    error: str | None = None
    image: np.ndarray | None = None  # HxWx3 uint8 RGB when status == "ok"
    width: int | None = None         # after EXIF orientation (header size when not decoded)
    height: int | None = None
    format: str | None = None


def image_id(data: bytes) -> str:
    """The project's image id: hex sha256 of the source file's bytes."""
    return hashlib.sha256(data).hexdigest()


def _describe(e: BaseException) -> str:
    msg = str(e).strip() or "no details"
    return f"{type(e).__name__}: {msg}"


def _to_srgb_via_icc(im: Image.Image) -> Image.Image | None:
    icc = im.info.get("icc_profile")
    if not icc:
        return None
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
    except Exception:  # noqa: BLE001 - a broken profile falls back to the plain conversion
        return None


def _over_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.float32)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.clip(np.rint(rgb * a + 255.0 * (1.0 - a)), 0, 255).astype(np.uint8)


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 RGB (see the module docstring for the rules)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im)
        if mode == "F":
            a = a.astype(np.float64)
            a = np.nan_to_num(a)
            a = a * 255.0 if a.max(initial=0.0) <= 1.0 else a
        elif mode == "I" and a.max(initial=0) <= 255:
            a = a.astype(np.float64)
        else:  # 16-bit data (PNG/TIFF "I;16*", or "I" holding 16-bit values)
            a = a.astype(np.float64) / 257.0
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
        if mode == "RGB":
            return np.asarray(im, dtype=np.uint8)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _over_white(np.asarray(im.convert("RGBA"), dtype=np.uint8))
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        via_icc = _to_srgb_via_icc(im) if mode == "CMYK" else None
        return np.asarray(via_icc if via_icc is not None else im.convert("RGB"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int = DEFAULT_MIN_SIDE) -> Decoded:
    """Decode untrusted bytes to RGB; every failure is a status with readable text."""
    if data is None or len(data) == 0:
        return Decoded(STATUS_DECODE_ERROR, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(data))
            except Image.DecompressionBombError as e:
                # Pillow's own guard (2x Image.MAX_IMAGE_PIXELS) fired while reading the header.
                return Decoded(STATUS_TOO_LARGE, f"header declares a decompression bomb, refused before "
                                                 f"decoding ({e})")
            except UnidentifiedImageError:
                head = bytes(data[:16])
                return Decoded(STATUS_DECODE_ERROR,
                               f"not a recognised image format ({len(data)} bytes, starts with {head!r})")
            with im:
                fmt = im.format
                w, h = int(im.size[0]), int(im.size[1])
                if w * h > max_pixels:
                    return Decoded(STATUS_TOO_LARGE,
                                   f"header declares {w}x{h} = {w * h} pixels > max_pixels {max_pixels}; "
                                   f"refused before decoding", width=w, height=h, format=fmt)
                if min(w, h) < min_side:
                    return Decoded(STATUS_TOO_SMALL, f"image is {w}x{h}, smaller than min_image_side {min_side}",
                                   width=w, height=h, format=fmt)
                try:
                    im.load()
                except Exception as e:  # noqa: BLE001 - truncated / corrupt pixel data
                    return Decoded(STATUS_DECODE_ERROR, f"{fmt or 'image'} {w}x{h}: pixel data unreadable "
                                                        f"({_describe(e)})", width=w, height=h, format=fmt)
                try:
                    oriented = ImageOps.exif_transpose(im)
                except Exception:  # noqa: BLE001 - broken EXIF: keep the stored orientation
                    oriented = im
                if oriented is None:
                    oriented = im
                arr = to_rgb_array(oriented)
                if arr.ndim != 3 or arr.shape[2] != 3:
                    return Decoded(STATUS_DECODE_ERROR, f"unexpected decoded shape {arr.shape} (mode {im.mode})",
                                   width=w, height=h, format=fmt)
                return Decoded(STATUS_OK, None, np.ascontiguousarray(arr), width=int(arr.shape[1]),
                               height=int(arr.shape[0]), format=fmt)
    except Exception as e:  # noqa: BLE001 - never raise on data
        return Decoded(STATUS_DECODE_ERROR, f"cannot decode image ({_describe(e)})")
