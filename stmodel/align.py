"""FFHQ-style face alignment from MTCNN's 5 landmarks (pure maths, numpy + PIL, no Ray).

The FFHQ recipe (NVlabs/ffhq-dataset `recreate_aligned_images`, also used by pSp / e4e /
Style Transformer as `align_face`) builds an oriented square ("quad") from the two eye centres
and the two outer mouth corners, then: shrink (integer downscale when the quad is much larger
than the output), crop (quad + border), pad by reflection with a blurred, median-faded border
where the quad leaves the image, and a QUAD transform resampled to the output size
(supersampled `supersample`x then Lanczos-downscaled, 4x as in FFHQ's 4096 -> 1024, lowered
to what the quad's own resolution can use unless `adaptive=False`).

MTCNN's points (left eye, right eye, nose, mouth left, mouth right; "left" = image left) stand
in for the means of the 68-point eye contours and the mouth corners 48 / 54.

    ffhq_quad(landmarks5)                  -> (quad [4, 2] float64, qsize)
    crop_from_quad(image, quad, size, ...) -> HxWx3 uint8 crop (re-crop without re-detection)
    align_face(image, landmarks5, size)    -> (crop, quad float32 [4, 2] in source pixels)
    crop_to_source(quad, size)             -> 3x3 affine: crop pixel (u, v, 1) -> source (x, y, 1)
    paste_back(photo, crop, quad)          -> photo with the (edited) crop warped back, soft-blended
    paste_mask(shape, quad)                -> HxW float32 blend weight paste_back uses (0 outside the quad)
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

LANCZOS = Image.Resampling.LANCZOS
BILINEAR = Image.Resampling.BILINEAR


def ffhq_quad(landmarks5) -> tuple[np.ndarray, float]:
    """The FFHQ alignment quad (corners: top-left, bottom-left, bottom-right, top-right, as
    PIL's QUAD transform wants them) and its side length, from 5 MTCNN points [5, 2] (x, y)."""
    lm = np.asarray(landmarks5, dtype=np.float64).reshape(5, 2)
    eye_left, eye_right = lm[0], lm[1]
    mouth_left, mouth_right = lm[3], lm[4]
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    norm = np.hypot(*x)
    if not np.isfinite(norm) or norm <= 0:
        raise ValueError("degenerate landmarks: cannot orient the face")
    x /= norm
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    qsize = float(np.hypot(*x) * 2)
    return quad, qsize


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a[..., :3]), "RGB")


def _pad_reflect_blend(img: Image.Image, pad: np.ndarray, qsize: float) -> Image.Image:
    """FFHQ's padding: reflect, then blur and fade to the median colour towards the new edges
    (vectorised; the blur is PIL's Gaussian on the 8-bit padded image)."""
    pl, pt, pr, pb = (int(v) for v in pad)
    a = np.asarray(img, dtype=np.uint8)
    a = np.pad(a, ((pt, pb), (pl, pr), (0, 0)), mode="reflect")
    h, w, _ = a.shape
    ys = np.arange(h, dtype=np.float32)[:, None, None]
    xs = np.arange(w, dtype=np.float32)[None, :, None]
    pl_, pt_, pr_, pb_ = (max(float(v), 1.0) for v in (pl, pt, pr, pb))
    mask = np.maximum(1.0 - np.minimum(xs / pl_, (w - 1 - xs) / pr_),
                      1.0 - np.minimum(ys / pt_, (h - 1 - ys) / pb_))  # [h, w, 1] by broadcasting
    blur_radius = qsize * 0.02
    f = a.astype(np.float32)
    if blur_radius > 0:
        blurred = np.asarray(Image.fromarray(a, "RGB").filter(ImageFilter.GaussianBlur(blur_radius)),
                             dtype=np.float32)
        f += (blurred - f) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    f += (np.median(f, axis=(0, 1)) - f) * np.clip(mask, 0.0, 1.0)
    return Image.fromarray(np.clip(np.rint(f), 0, 255).astype(np.uint8), "RGB")


def crop_from_quad(image, quad, size: int = 1024, supersample: int = 4,
                   enable_padding: bool = True, adaptive: bool = True) -> np.ndarray:
    """Resample the oriented square `quad` (source pixels) of `image` to size x size, as FFHQ.

    `supersample` is FFHQ's transform_size / output_size (4). With `adaptive`, it is lowered to
    ceil(quad side / size) after the shrink step: supersampling only helps where the quad has
    more source pixels than the output (measured: >= 45 dB from the fixed 4x result, while an
    upscaled face - the common 1024 case - costs 1 transform at 1x instead of 16x the pixels)."""
    img = _as_pil(image)
    quad = np.array(quad, dtype=np.float64).reshape(4, 2)
    qsize = float(np.hypot(*(quad[3] - quad[0])))

    # Shrink. (FFHQ resizes the whole photo; cutting first a window aligned to the shrink grid,
    # with a margin wider than the Lanczos support, gives the same pixels for far less work.)
    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:
        margin = (max(int(np.rint(qsize / shrink * 0.1)), 3) + 4) * shrink
        x0 = max(int(np.floor((quad[:, 0].min() - margin) / shrink)) * shrink, 0)
        y0 = max(int(np.floor((quad[:, 1].min() - margin) / shrink)) * shrink, 0)
        x1 = min(int(np.ceil((quad[:, 0].max() + margin) / shrink)) * shrink, img.size[0])
        y1 = min(int(np.ceil((quad[:, 1].max() + margin) / shrink)) * shrink, img.size[1])
        if x1 <= x0 or y1 <= y0:
            raise ValueError("face quad lies outside the image")
        if (x0, y0, x1, y1) != (0, 0, img.size[0], img.size[1]):
            img = img.crop((x0, y0, x1, y1))
            quad -= (x0, y0)
        rsize = (max(1, int(np.rint(float(img.size[0]) / shrink))), max(1, int(np.rint(float(img.size[1]) / shrink))))
        img = img.resize(rsize, LANCZOS)
        quad /= shrink
        qsize /= shrink

    # Crop.
    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
            int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0),
            min(crop[2] + border, img.size[0]), min(crop[3] + border, img.size[1]))
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        if crop[2] <= crop[0] or crop[3] <= crop[1]:
            raise ValueError("face quad lies outside the image")
        img = img.crop(crop)
        quad -= crop[0:2]

    # Pad.
    pad = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
           int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    pad = (max(-pad[0] + border, 0), max(-pad[1] + border, 0),
           max(pad[2] - img.size[0] + border, 0), max(pad[3] - img.size[1] + border, 0))
    if enable_padding and max(pad) > border - 4:
        pad_arr = np.maximum(pad, int(np.rint(qsize * 0.3)))
        img = _pad_reflect_blend(img, pad_arr, qsize)
        quad += pad_arr[:2]

    # Transform.
    ss = max(1, int(supersample))
    if adaptive:
        ss = min(ss, max(1, int(np.ceil(qsize / size - 1e-6))))
    transform_size = int(size * ss)
    img = img.transform((transform_size, transform_size), Image.Transform.QUAD,
                        tuple((quad + 0.5).flatten()), BILINEAR)
    if size < transform_size:
        img = img.resize((size, size), LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def align_face(image, landmarks5, size: int = 1024, supersample: int = 4,
               enable_padding: bool = True, adaptive: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """FFHQ-aligned crop [size, size, 3] uint8 and its quad [4, 2] float32 in source pixels."""
    quad, _ = ffhq_quad(landmarks5)
    crop = crop_from_quad(image, quad, size=size, supersample=supersample, enable_padding=enable_padding,
                          adaptive=adaptive)
    return crop, quad.astype(np.float32)


def crop_to_source(quad, size: int) -> np.ndarray:
    """3x3 affine taking crop pixel coordinates (u, v, 1) to source pixel coordinates (x, y, 1).

    Pixel coordinates index pixel centres (as detectors report them). The quad is a square, so
    PIL's bilinear QUAD mapping is affine; with the recipe's `quad + 0.5` it samples source
    (x, y) = q0 + (u + 0.5) * ex + (v + 0.5) * ey, also after supersampling."""
    q = np.asarray(quad, dtype=np.float64).reshape(4, 2)
    ex = (q[3] - q[0]) / size  # along the top edge: top-left -> top-right
    ey = (q[1] - q[0]) / size  # along the left edge: top-left -> bottom-left
    m = np.eye(3)
    m[:2, 0], m[:2, 1], m[:2, 2] = ex, ey, q[0] + 0.5 * (ex + ey)
    return m


def source_to_crop(points, quad, size: int) -> np.ndarray:
    """Map source-pixel points [N, 2] into the aligned crop's pixel frame."""
    m = np.linalg.inv(crop_to_source(quad, size))
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (p @ m[:2, :2].T) + m[:2, 2]


def _radii(radii) -> tuple[float, float]:
    r = np.broadcast_to(np.asarray(radii, dtype=np.float64), (2,))
    return float(np.clip(r[0], 1e-3, 1.0)), float(np.clip(r[1], 1e-3, 1.0))


def _mask_box(quad, hw, radii) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the ellipse's bounding box, inside the quad's, clipped to the photo.
    Only this window is warped and blended (a rotated quad's box is up to 2x its area)."""
    q = np.asarray(quad, dtype=np.float64).reshape(4, 2)
    rx, ry = _radii(radii)
    c, h1, h2 = (q[0] + q[2]) / 2, (q[3] - q[0]) / 2, (q[1] - q[0]) / 2
    ext = np.hypot(rx * h1, ry * h2)  # per axis: half extent of c + rx cos(a) h1 + ry sin(a) h2
    lo, hi = np.maximum(c - ext, q.min(0)), np.minimum(c + ext, q.max(0))
    x0, y0 = (max(int(np.floor(v)), 0) for v in lo)
    x1, y1 = (int(np.ceil(v)) + 1 for v in hi)
    return x0, y0, max(min(x1, int(hw[1])), x0), max(min(y1, int(hw[0])), y0)


def _ellipse_mask(quad, box, feather: float, radii) -> np.ndarray:
    """The soft face mask over the photo window `box`, computed in the quad's own frame."""
    q = np.asarray(quad, dtype=np.float64).reshape(4, 2)
    x0, y0, x1, y1 = box
    rx, ry = _radii(radii)
    # (s, t) in [-1, 1]^2 is the crop square exactly: by crop_to_source, photo pixel
    # q0 + a (q3 - q0) + b (q1 - q0) is continuous crop coordinate (a, b) * size.
    inv = 2.0 * np.linalg.inv(np.stack([q[3] - q[0], q[1] - q[0]], axis=1)) / [[rx], [ry]]
    s0, t0 = inv @ ([x0, y0] - q[0]) - [1.0 / rx, 1.0 / ry]
    xs, ys = np.arange(x1 - x0, dtype=np.float32), np.arange(y1 - y0, dtype=np.float32)
    s = np.float32(s0) + np.float32(inv[0, 0]) * xs[None, :] + np.float32(inv[0, 1]) * ys[:, None]
    t = np.float32(t0) + np.float32(inv[1, 0]) * xs[None, :] + np.float32(inv[1, 1]) * ys[:, None]
    m = np.sqrt(s * s + t * t)
    np.subtract(1.0, m, out=m)
    np.clip(m / np.float32(max(float(feather), 1e-3)), 0.0, 1.0, out=m)
    return m * m * (3.0 - 2.0 * m)  # smoothstep: no kink in the weight, hence no visible seam


def paste_mask(shape, quad, feather: float = 0.25, radii=(0.8, 0.9)) -> np.ndarray:
    """Blend weight [H, W] float32 in [0, 1] that `paste_back` uses (for PSNR inside / outside).

    A soft ellipse centred in the quad, radii as fractions of its half side (clipped to <= 1, so
    the mask is exactly 0 on and outside the quad), fading to 0 over the outer `feather`
    fraction of the radius: the seam falls on a smooth ramp, never on the crop's square edge."""
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((h, w), np.float32)
    x0, y0, x1, y1 = box = _mask_box(quad, (h, w), radii)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = _ellipse_mask(quad, box, feather, radii)
    return out


def paste_back(photo: np.ndarray, crop: np.ndarray, quad, *, feather: float = 0.25, radii=(0.8, 0.9),
               pad: int = 4) -> np.ndarray:
    """A copy of `photo` with `crop` (the aligned, possibly edited crop of `quad`) warped back
    and blended in with `paste_mask`'s weight.

    The warp is the exact inverse of `crop_to_source`, so an unedited crop lands where it came
    from, and it runs only over the mask's window inside the quad's bounding box. A crop larger
    than the face is first Lanczos-resized to the face's size, since PIL's bicubic transform
    does not antialias; `pad` edge-replicated pixels around the crop keep the transform's black
    fill out of the bicubic support. Where the weight is 0 (everywhere outside the quad) the
    pixels stay bit-exact."""
    out = np.array(photo, dtype=np.uint8, copy=True)
    q = np.asarray(quad, dtype=np.float64).reshape(4, 2)
    x0, y0, x1, y1 = box = _mask_box(q, out.shape[:2], radii)
    if x1 <= x0 or y1 <= y0:
        return out
    img = _as_pil(crop)
    size = img.size[0]
    if img.size[1] != size:
        raise ValueError(f"aligned crops are square, got {img.size[0]}x{img.size[1]}")
    qsize = float(max(np.hypot(*(q[3] - q[0])), np.hypot(*(q[1] - q[0]))))
    if size > 1.1 * qsize:  # within 10% bicubic alone barely aliases, and the resize costs ~25%
        size = max(1, int(np.ceil(qsize)))
        img = img.resize((size, size), LANCZOS)
    # Window pixel (i, j) is photo pixel (x0 + i, y0 + j); PIL's transform maps continuous
    # coordinates (index + 0.5) at both ends, and the padded crop is shifted by `pad`.
    inv = np.linalg.inv(crop_to_source(q, size))
    a = inv[:2, :2]
    off = a @ np.array([x0 - 0.5, y0 - 0.5]) + inv[:2, 2] + 0.5 + pad
    src = Image.fromarray(np.pad(np.asarray(img), ((pad, pad), (pad, pad), (0, 0)), mode="edge"), "RGB")
    coeffs = (a[0, 0], a[0, 1], off[0], a[1, 0], a[1, 1], off[1])
    warped = src.transform((x1 - x0, y1 - y0), Image.Transform.AFFINE, coeffs, Image.Resampling.BICUBIC)
    m = _ellipse_mask(q, box, feather, radii)[..., None]
    win = out[y0:y1, x0:x1]
    base = win.astype(np.float32)
    win[...] = np.rint(base + m * (np.asarray(warped, dtype=np.float32) - base)).astype(np.uint8)
    return out
