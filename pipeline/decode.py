"""Robust decoding of untrusted image bytes to RGB uint8. Never raises on data.

    image_id(data)                          -> hex sha256 of the bytes (the project's image id)
    decode_image(data, max_pixels, min_side) -> Decoded(status, error, image, width, height)
    decode_image(data, ..., min_long_side=1500) -> a large JPEG decoded at 1/2, 1/4 or 1/8 scale
    decode_region(data, reduce, box)        -> the pixels of one box of the photo, at 1/reduce scale

Reduced decoding (camera photos): libjpeg's DCT scaling (Pillow's `draft`) decodes a JPEG at
1/2, 1/4 or 1/8 of its size for a fraction of the work of a full decode (4000x3000: about 1/4 of
the time at 1/2 scale, 1/5 at 1/4); each pixel comes from a reduced inverse DCT of its r x r
block (a clean low-pass, close to the block's average, no aliasing). `Decoded.pixel_map` = (a, bx, by)
says where they lie: pixel (u, v) of `image` is at (a * u + bx, a * v + by) in the full-resolution, EXIF-oriented
photo (pixel centres). `width` / `height` are always the full-resolution oriented size. Other
formats, and JPEGs too small to reduce, decode at full size with pixel_map (1, 0, 0).

Order of checks: empty -> header (format, declared size) -> allowed format -> frames -> pixel
limit / minimum side -> decode (full, or reduced) -> EXIF orientation -> conversion to RGB. The
pixel limit is checked on the size declared in the header, before any pixel data is decompressed (decompression bombs).

Conversions: CMYK/YCbCr/LAB/HSV -> RGB (through the embedded ICC profile when there is one),
grayscale and 1-bit -> RGB, palette -> RGB (transparency honoured), 16/32-bit integer and float
grayscale scaled to 8 bits (not clipped), alpha composited over a white background.

Formats: only the allowed formats' parsers ever see the bytes (`Image.open(formats=...)`);
default DEFAULT_FORMATS (JPEG, PNG, WebP, TIFF, BMP, GIF, and AVIF / HEIF where a Pillow
plugin for them is installed). A file in another format Pillow knows (ICO, PSD, EPS ...) is
`unsupported_format`, naming it; bytes no image parser recognises (a text file, a PDF) are
`decode_error`. A camera JPEG with an MPF index (Pillow's "MPO": the photo followed by
previews or depth maps) counts as JPEG, and its first image is the photo.

Multi-frame files (animated GIF / WebP / AVIF, multi-page TIFF): `multi_frame="refuse"`
(default) refuses them with status `multi_frame`, naming the frame count, since no single
frame is "the photo"; `multi_frame="first"` decodes the first frame (`Decoded.frames` keeps
the count).
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.status import (
    STATUS_DECODE_ERROR,
    STATUS_MULTI_FRAME,
    STATUS_OK,
    STATUS_TOO_LARGE,
    STATUS_TOO_SMALL,
    STATUS_UNSUPPORTED_FORMAT,
)

# the decoder's limits, also the defaults of every section's max_pixels and align.min_image_side
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MIN_SIDE = 32

MULTI_FRAME_POLICIES = ("refuse", "first")

Image.init()
_BASE_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")
# AVIF / HEIF only with a decoder for them (Pillow's own AVIF build, or the pillow-heif plugin)
DEFAULT_FORMATS = _BASE_FORMATS + tuple(f for f in ("AVIF", "HEIF") if f in Image.OPEN)
_SAME_AS = {"MPO": "JPEG"}  # the format Pillow reports -> the allowed format it counts as

JPEG_REDUCTIONS = (8, 4, 2)   # libjpeg's DCT scalings that Pillow's draft() offers
IDENTITY_MAP = (1.0, 0.0, 0.0)
# EXIF orientation -> the transpose that shows the photo upright (as ImageOps.exif_transpose)
ORIENTATION_METHODS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                       4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                       6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


@dataclass
class Decoded:
    status: str
    error: str | None = None
    image: np.ndarray | None = None  # HxWx3 uint8 RGB when status == STATUS_OK
    width: int | None = None         # after EXIF orientation (header size when not decoded), full resolution
    height: int | None = None
    format: str | None = None
    frames: int = 1                  # frames in the file (multi_frame="first" decoded the first)
    pixel_map: tuple[float, float, float] = IDENTITY_MAP  # image pixel (u, v) -> photo (a u + bx, a v + by)

    @property
    def reduce(self) -> int:
        return int(round(self.pixel_map[0]))

    @property
    def rgb(self) -> np.ndarray:
        """The decoded pixels, for a caller that checked status == STATUS_OK (there are none otherwise)."""
        if self.image is None:
            raise ValueError(f"no decoded pixels (status {self.status}: {self.error})")
        return self.image


def image_id(data: bytes) -> str:
    """The project's image id: hex sha256 of the source file's bytes."""
    return hashlib.sha256(data).hexdigest()


def allowed_formats(names=None) -> tuple[str, ...]:
    """The allow-list as Pillow format names (upper case); refuses a name Pillow cannot open."""
    if names is None:
        return DEFAULT_FORMATS
    out = tuple(dict.fromkeys(str(n).strip().upper() for n in ([names] if isinstance(names, str) else names)))
    unknown = [n for n in out if n not in Image.OPEN and n not in _SAME_AS]
    if unknown:
        raise ValueError(f"formats: Pillow cannot open {unknown}; known formats: {sorted(Image.OPEN)}")
    return out


def format_problems(names: list[str]) -> list[str]:
    """A `formats` setting's problems (a name Pillow cannot open), for a section's problems()."""
    try:
        allowed_formats(names)
    except ValueError as e:
        return [str(e)]
    return []


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


def _orientation(im: Image.Image) -> int:
    try:
        o = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - broken EXIF: keep the stored orientation
        return 1
    return o if o in ORIENTATION_METHODS else 1


def _oriented(w: int, h: int, o: int) -> tuple[int, int]:
    return (h, w) if o >= 5 else (w, h)


def jpeg_reduction(size: tuple[int, int], min_long_side: int | None) -> int:
    """The coarsest DCT scaling (8, 4, 2, else 1) that keeps the longer side >= min_long_side."""
    if not min_long_side:
        return 1
    w, h = size
    for r in JPEG_REDUCTIONS:
        if -(-max(w, h) // r) >= min_long_side and min(w, h) >= 8 * r:
            return r
    return 1


def _draft(im: Image.Image, r: int) -> int:
    """Ask the JPEG decoder for 1/r scale; returns the scale it will actually deliver."""
    if r <= 1 or im.format != "JPEG":
        return 1
    w, h = im.size
    im.draft(None, (w // r, h // r))
    rw, rh = im.size
    for s in (1, *JPEG_REDUCTIONS):
        if (rw, rh) == (-(-w // s), -(-h // s)):
            return s
    raise ValueError(f"unexpected reduced JPEG size {rw}x{rh} for {w}x{h}")  # not reached with Pillow's draft


def _pixel_map(r: int, o: int, full: tuple[int, int], reduced: tuple[int, int]) -> tuple[float, float, float]:
    """pixel_map of an oriented image decoded at 1/r (stored sizes `full` and `reduced`). A
    reduced pixel is the average of an r x r block, whose centre is at r u + (r - 1) / 2; along
    an axis the orientation flips, the partial last block (size not a multiple of r) comes first."""
    if r == 1:
        return IDENTITY_MAP
    fw, fh = _oriented(*full, o)
    rw, rh = _oriented(*reduced, o)
    bx = 0.5 * r - 0.5 + ((fw - rw * r) if o in (2, 3, 6, 7) else 0)
    by = 0.5 * r - 0.5 + ((fh - rh * r) if o in (3, 4, 7, 8) else 0)
    return float(r), float(bx), float(by)


def _stored_box(box: tuple[int, int, int, int], o: int, stored: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box [u0, u1) x [v0, v1) of the oriented image -> the same pixels' box in the stored one."""
    u0, v0, u1, v1 = box
    sw, sh = stored
    return {1: (u0, v0, u1, v1), 2: (sw - u1, v0, sw - u0, v1), 3: (sw - u1, sh - v1, sw - u0, sh - v0),
            4: (u0, sh - v1, u1, sh - v0), 5: (v0, u0, v1, u1), 6: (v0, sh - u1, v1, sh - u0),
            7: (sw - v1, sh - u1, sw - v0, sh - u0), 8: (sw - v1, u0, sw - v0, u1)}[o]


def _other_format(data: bytes) -> str | None:
    """The format of bytes that no allowed parser took, if any Pillow parser knows it (header
    only: the file is closed before any pixel is decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except Exception:  # noqa: BLE001 - not an image at all
        return None


def _frames(im: Image.Image) -> int:
    if not getattr(im, "is_animated", False):
        return 1
    try:
        return int(getattr(im, "n_frames", 2))  # only the multi-frame formats' classes define it
    except Exception:  # noqa: BLE001 - a broken later frame: at least two
        return 2


def _open(data: bytes, max_pixels: int, min_side: int, formats=None,
          multi_frame: str = "refuse") -> tuple[Image.Image, int] | Decoded:
    """(image, frames) with the header checked, or the failed Decoded."""
    if data is None or len(data) == 0:
        return Decoded(STATUS_DECODE_ERROR, "empty file (0 bytes)")
    allowed = allowed_formats(formats)
    parsers = sorted(set(allowed) | {k for k, v in _SAME_AS.items() if v in allowed} - set(_SAME_AS))
    try:
        im = Image.open(io.BytesIO(data), formats=parsers)
    except Image.DecompressionBombError as e:
        # Pillow's own guard (2x Image.MAX_IMAGE_PIXELS) fired while reading the header.
        return Decoded(STATUS_TOO_LARGE,
                       f"header declares a decompression bomb, refused before decoding ({e})")
    except UnidentifiedImageError:
        other = _other_format(data)
        if other is not None:
            return Decoded(STATUS_UNSUPPORTED_FORMAT, f"{other} image: format not in the allowed formats "
                           f"{list(allowed)}", format=other)
        head = bytes(data[:16])
        return Decoded(STATUS_DECODE_ERROR,
                       f"not a recognised image format ({len(data)} bytes, starts with {head!r})")
    fmt = im.format
    if fmt is None or _SAME_AS.get(fmt, fmt) not in allowed:
        im.close()
        return Decoded(STATUS_UNSUPPORTED_FORMAT, f"{fmt} image: format not in the allowed formats {list(allowed)}",
                       format=fmt)
    w, h = int(im.size[0]), int(im.size[1])
    frames = 1 if fmt == "MPO" else _frames(im)
    if frames > 1 and multi_frame != "first":
        im.close()
        return Decoded(STATUS_MULTI_FRAME, f"{fmt} with {frames} frames (animated or multi-page): "
                       f"multi-frame files are refused (multi_frame=refuse; "
                       f"multi_frame=first decodes the first frame)",
                       width=w, height=h, format=fmt)
    if w * h > max_pixels:
        im.close()
        return Decoded(STATUS_TOO_LARGE, f"header declares {w}x{h} = {w * h} pixels > max_pixels {max_pixels}; "
                       f"refused before decoding", width=w, height=h, format=fmt)
    if min(w, h) < min_side:
        im.close()
        return Decoded(STATUS_TOO_SMALL, f"image is {w}x{h}, smaller than min_image_side {min_side}",
                       width=w, height=h, format=fmt)
    return im, frames


def _load(im: Image.Image, reduce: int) -> tuple[int, int, tuple[int, int]] | Decoded:
    """Decode the pixels (at 1/reduce scale for a JPEG): (reduction, orientation, full size) or
    a failed Decoded."""
    fmt, full = im.format, (int(im.size[0]), int(im.size[1]))
    try:
        r = _draft(im, reduce)
        im.load()
    except Exception as e:  # noqa: BLE001 - truncated / corrupt pixel data
        return Decoded(STATUS_DECODE_ERROR, f"{fmt or 'image'} {full[0]}x{full[1]}: pixel data unreadable "
                       f"({_describe(e)})", width=full[0], height=full[1], format=fmt)
    return r, _orientation(im), full


def _finish(im: Image.Image, o: int, full_oriented: tuple[int, int], pixel_map, fmt, frames: int = 1) -> Decoded:
    if o != 1:
        im = im.transpose(ORIENTATION_METHODS[o])
    arr = to_rgb_array(im)
    if arr.ndim != 3 or arr.shape[2] != 3:
        return Decoded(STATUS_DECODE_ERROR, f"unexpected decoded shape {arr.shape} (mode {im.mode})",
                       width=full_oriented[0], height=full_oriented[1], format=fmt)
    return Decoded(STATUS_OK, None, np.ascontiguousarray(arr), width=int(full_oriented[0]),
                   height=int(full_oriented[1]), format=fmt, frames=frames, pixel_map=pixel_map)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int = DEFAULT_MIN_SIDE, min_long_side: int | None = None,
                 formats=None, multi_frame: str = "refuse") -> Decoded:
    """Decode untrusted bytes to RGB; every failure is a status with readable text.

    `min_long_side`: a JPEG whose longer side allows it is decoded at the coarsest DCT scale
    (1/8, 1/4, 1/2) that keeps its longer side >= min_long_side (see the module docstring).
    `formats`: the allowed formats (default DEFAULT_FORMATS); `multi_frame`: refuse | first."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = _open(data, max_pixels, min_side, formats, multi_frame)
            if isinstance(opened, Decoded):
                return opened
            im, frames = opened
            with im:
                fmt = im.format
                loaded = _load(im, jpeg_reduction(im.size, min_long_side) if fmt == "JPEG" else 1)
                if isinstance(loaded, Decoded):
                    return loaded
                r, o, full = loaded
                return _finish(im, o, _oriented(*full, o), _pixel_map(r, o, full, im.size), fmt, frames)
    except Exception as e:  # noqa: BLE001 - never raise on data
        return Decoded(STATUS_DECODE_ERROR, f"cannot decode image ({_describe(e)})")


def decode_region(data: bytes, reduce: int, box, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """The pixels of `box` = (x0, y0, x1, y1) of the full-resolution oriented photo (any floats;
    clipped to the photo), decoded at 1/reduce scale where the format allows (JPEG; else 1):
    only that window is cut out, oriented and converted to RGB. `pixel_map` maps the window's
    pixels into the photo; `width` / `height` are the whole photo's. Never raises on data.
    The bytes were admitted by `decode_image` already: any format, the first frame."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = _open(data, max_pixels, 1, tuple(Image.OPEN), "first")
            if isinstance(opened, Decoded):
                return opened
            im = opened[0]
            with im:
                fmt = im.format
                loaded = _load(im, int(reduce) if fmt == "JPEG" else 1)
                if isinstance(loaded, Decoded):
                    return loaded
                r, o, full = loaded
                a, bx, by = _pixel_map(r, o, full, im.size)
                ow, oh = _oriented(int(im.size[0]), int(im.size[1]), o)
                x0, y0, x1, y1 = (float(v) for v in box)
                u0 = min(max(int(np.floor((x0 - bx) / a)), 0), ow - 1)
                v0 = min(max(int(np.floor((y0 - by) / a)), 0), oh - 1)
                u1 = max(min(int(np.ceil((x1 - bx) / a)) + 1, ow), u0 + 1)
                v1 = max(min(int(np.ceil((y1 - by) / a)) + 1, oh), v0 + 1)
                window = im.crop(_stored_box((u0, v0, u1, v1), o, im.size))
                return _finish(window, o, _oriented(*full, o), (a, bx + a * u0, by + a * v0), fmt)
    except Exception as e:  # noqa: BLE001 - never raise on data
        return Decoded(STATUS_DECODE_ERROR, f"cannot decode image ({_describe(e)})")
