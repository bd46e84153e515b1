"""Paste-back (stmodel.align.paste_back / paste_mask): the inverse of the FFHQ alignment warp,
blended in with a feathered mask.

Thresholds (skimage's astronaut, landmarks from an MTCNN detection, crops at 1024):
- identity paste-back: face core (mask == 1) >= 30 dB PSNR (observed ~36.6 dB on the photo
  itself; what is left is the crop's bilinear upsampling and the downsampling back); a quad
  off by one pixel scores clearly lower (observed ~27 dB), so the bound checks the inverse is
  exact, not merely close;
- every pixel whose centre is outside the quad (and every pixel where the mask is 0) is
  bit-identical to the photo.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stmodel.align import align_face, paste_back, paste_mask

SIZE = 1024
PSNR_CORE_DB = 30.0
# Left eye, right eye, nose, mouth left, mouth right of skimage's astronaut (an MTCNN detection).
LM = np.array([[205.0, 101.7], [246.8, 103.7], [224.7, 129.0], [201.7, 139.2], [245.3, 141.9]])


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def psnr(a: np.ndarray, b: np.ndarray, sel: np.ndarray) -> float:
    d = a[sel].astype(np.float64) - b[sel].astype(np.float64)
    return float(10 * np.log10(255.0 ** 2 / max(np.mean(d ** 2), 1e-10)))


def outside_quad(shape, quad) -> np.ndarray:
    """Pixels whose centres lie strictly outside the quad polygon (independent of paste_mask)."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    q = np.asarray(quad, dtype=np.float64)
    inside = np.ones(shape[:2], bool)
    for a, b in zip(q, np.roll(q, -1, axis=0)):  # the quad is convex: inside every edge's half-plane
        cross = (b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0])
        inside &= cross <= 1e-9
    if not inside.any():  # the corner order may wind the other way
        inside = np.ones(shape[:2], bool)
        for a, b in zip(q, np.roll(q, -1, axis=0)):
            inside &= (b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0]) >= -1e-9
    return ~inside


def similarity_warp(img: np.ndarray, angle: float, scale: float, margin=(0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Rotate / scale the photo onto a canvas that holds all of it plus `margin` (left/top and
    right/bottom); returns the new photo and the 2x3 map from old to new pixel indices."""
    h, w = img.shape[:2]
    th = np.deg2rad(angle)
    a = scale * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], np.float64) @ a.T
    t = -corners.min(0) + margin
    size = np.ceil(corners.max(0) + t + margin).astype(int)
    # PIL maps continuous coordinates (index + 0.5); build the index map around that.
    t_idx = t + a @ [0.5, 0.5] - 0.5
    inv = np.linalg.inv(np.vstack([np.c_[a, t], [0, 0, 1]]))
    out = Image.fromarray(img).transform(tuple(int(s) for s in size), Image.Transform.AFFINE,
                                         tuple(inv[:2].flatten()), Image.Resampling.BICUBIC,
                                         fillcolor=(90, 120, 150))
    return np.asarray(out), np.c_[a, t_idx]


def check_identity(photo: np.ndarray, lm: np.ndarray, size: int = SIZE, edge: int = 0) -> float:
    """Identity paste-back; the PSNR skips `edge` pixels along the photo's border (where FFHQ's
    padding blurs the crop itself)."""
    crop, quad = align_face(photo, lm, size=size)
    out = paste_back(photo, crop, quad)
    assert out.shape == photo.shape and out.dtype == np.uint8 and out is not photo
    mask = paste_mask(photo.shape, quad)
    assert mask.shape == photo.shape[:2] and mask.dtype == np.float32
    outside = outside_quad(photo.shape, quad)
    assert (mask[outside] == 0).all() and (mask == 1).sum() > 500
    np.testing.assert_array_equal(out[outside], photo[outside])
    np.testing.assert_array_equal(out[mask == 0], photo[mask == 0])
    core = mask == 1
    if edge:
        core[:edge], core[-edge:], core[:, :edge], core[:, -edge:] = False, False, False, False
    p = psnr(out, photo, core)
    assert p >= PSNR_CORE_DB
    print(f"core PSNR {p:.2f} dB")
    return p


# ------------------------------------------------------------------------------------------------

def test_identity_paste_back_reproduces_the_face_and_nothing_else(astronaut):
    before = astronaut.copy()
    p = check_identity(astronaut, LM)
    np.testing.assert_array_equal(astronaut, before)  # the input is not written to
    crop, quad = align_face(astronaut, LM, size=SIZE)
    core = paste_mask(astronaut.shape, quad) == 1
    off = psnr(paste_back(astronaut, crop, quad + np.float32(1.0)), astronaut, core)
    assert off <= p - 4  # an inverse off by one pixel is measurably worse: the mapping is exact


def test_mask_is_soft_and_inside_the_quad(astronaut):
    _, quad = align_face(astronaut, LM, size=SIZE)
    m = paste_mask(astronaut.shape, quad)
    centre = np.rint(quad.mean(0)).astype(int)
    assert m[centre[1], centre[0]] == 1 and m.min() == 0 and m.max() == 1
    assert ((m > 0) & (m < 1)).sum() > 0.2 * (m > 0).sum()              # a real feather band
    step = max(np.abs(np.diff(m, axis=0)).max(), np.abs(np.diff(m, axis=1)).max())
    assert step < 0.15                                                   # no hard edge anywhere
    wide, narrow = paste_mask(astronaut.shape, quad, feather=0.6), paste_mask(astronaut.shape, quad, feather=0.05)
    assert (wide == 1).sum() < (m == 1).sum() < (narrow == 1).sum()      # feather is the ramp's width
    assert np.abs(np.diff(narrow, axis=1)).max() > step


@pytest.mark.parametrize("angle,scale,margin,size", [(30, 1.0, (0, 0), SIZE), (-20, 0.6, (120, 40), SIZE),
                                                     (10, 2.5, (0, 90), SIZE), (180, 1.3, (40, 0), SIZE),
                                                     (-35, 2.0, (30, 30), 256)])
def test_identity_on_transformed_photos(astronaut, angle, scale, margin, size):
    img, m = similarity_warp(astronaut, angle, scale, np.asarray(margin, np.float64))
    check_identity(img, LM @ m[:, :2].T + m[:, 2], size=size)


def test_identity_after_exif_orientation(astronaut):
    from pipeline.decode import decode_image

    exif = Image.Exif()
    exif[0x0112] = 6  # display: rotate 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(np.rot90(astronaut, 1).copy()).save(buf, format="JPEG", quality=95, exif=exif)
    d = decode_image(buf.getvalue())
    assert d.status == "ok" and d.image.shape == astronaut.shape      # upright again: LM applies
    check_identity(d.image, LM)


def test_changed_crop_changes_only_the_face(astronaut):
    crop, quad = align_face(astronaut, LM, size=SIZE)
    out = paste_back(astronaut, 255 - crop, quad)
    mask = paste_mask(astronaut.shape, quad)
    changed = (out != astronaut).any(axis=2)
    assert not changed[outside_quad(astronaut.shape, quad)].any() and not changed[mask == 0].any()
    core = mask == 1
    assert changed[core].mean() > 0.95
    assert psnr(out, 255 - astronaut, core) >= PSNR_CORE_DB             # the edit lands where it belongs
    # Across the feather the result moves monotonically from the photo to the edit.
    half = (mask > 0.4) & (mask < 0.6)
    frac = np.abs(out[half].astype(float) - astronaut[half]) / np.maximum(np.abs(255.0 - 2 * astronaut[half]), 1)
    assert 0.3 < np.median(frac[np.abs(255.0 - 2 * astronaut[half]) > 60]) < 0.7


def test_two_faces_paste_independently(astronaut):
    photo = np.concatenate([astronaut, astronaut], axis=1)
    lms = [LM, LM + [astronaut.shape[1], 0]]
    crops, quads = zip(*(align_face(photo, lm, size=SIZE) for lm in lms))
    edits = [255 - crops[0], crops[1][..., ::-1]]                       # inverted; channels swapped
    one = paste_back(photo, edits[0], quads[0])
    both = paste_back(one, edits[1], quads[1])
    out0, out1 = outside_quad(photo.shape, quads[0]), outside_quad(photo.shape, quads[1])
    np.testing.assert_array_equal(one[out0], photo[out0])               # face 2 untouched by face 1
    np.testing.assert_array_equal(both[~out0], one[~out0])              # face 1 untouched by face 2
    np.testing.assert_array_equal(both[out0 & out1], photo[out0 & out1])
    np.testing.assert_array_equal(both, paste_back(paste_back(photo, edits[1], quads[1]), edits[0], quads[0]))
    for k in (0, 1):
        core = paste_mask(photo.shape, quads[k]) == 1
        want = 255 - photo if k == 0 else photo[..., ::-1]
        assert psnr(both, want, core) >= PSNR_CORE_DB


def test_quad_past_the_photo_border(astronaut):
    cut = np.ascontiguousarray(astronaut[60:, 180:])                    # the face at the top-left edge
    lm = LM - [180, 60]
    crop, quad = align_face(cut, lm, size=SIZE)
    assert quad.min() < 0
    mask = paste_mask(cut.shape, quad)
    assert mask[0].max() > 0.5 and mask[:, 0].max() > 0.5                # the face region is cut by the edge
    check_identity(cut, lm, edge=20)  # observed 37.1 dB (30.6 with the blurred edge band)
    out = paste_back(cut, 255 - crop, quad)
    assert (out != cut).any(axis=2)[mask == 1].mean() > 0.95
    np.testing.assert_array_equal(out[mask == 0], cut[mask == 0])
    gone = quad - [1000, 1000]                                           # entirely off the photo
    np.testing.assert_array_equal(paste_back(cut, crop, gone), cut)
    assert paste_mask(cut.shape, gone).max() == 0


def test_large_crop_is_antialiased_into_a_small_face(astronaut):
    _, quad = align_face(astronaut, LM, size=SIZE)
    checker = np.zeros((SIZE, SIZE, 3), np.uint8)
    checker[(np.add.outer(np.arange(SIZE), np.arange(SIZE)) % 2) == 1] = 255   # 1-px checkerboard
    out = paste_back(astronaut, checker, quad)
    core = paste_mask(astronaut.shape, quad) == 1
    v = out[core].astype(np.float64)
    assert abs(v.mean() - 127.5) < 6 and v.std() < 8                    # grey, not an aliased pattern


def test_crop_edge_brings_in_no_fill_colour(astronaut):
    _, quad = align_face(astronaut, LM, size=SIZE)
    grey = np.full((SIZE, SIZE, 3), 200, np.uint8)
    out = paste_back(astronaut, grey, quad, feather=0.02, radii=1.0).astype(int)  # the mask reaches the edge
    lo, hi = np.minimum(astronaut, 200).astype(int), np.maximum(astronaut, 200).astype(int)
    assert (out >= lo - 1).all() and (out <= hi + 1).all()  # only blends of photo and crop, no black
    assert (out == 200).all(axis=2).sum() > 0.5 * (~outside_quad(astronaut.shape, quad)).sum()
