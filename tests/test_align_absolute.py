"""Absolute FFHQ alignment: where the recipe puts the eyes and the mouth, not just equivariance.

The FFHQ recipe (NVlabs/ffhq-dataset `recreate_aligned_images`) defines, from the eye centres
and the mouth corners:

    eye_avg = (eye_left + eye_right) / 2         eye_to_eye   = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) / 2   eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - flipud(eye_to_mouth) * [-1, 1];  x /= hypot(x)
    x *= max(hypot(eye_to_eye) * 2.0, hypot(eye_to_mouth) * 1.8)
    y = flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = [c - x - y, c - x + y, c + x + y, c + x - y]     # TL, BL, BR, TR; side 2 * |x|

and resamples that square to size x size, pixel centres at (i + 0.5) of the square's side / size.

Template (worked out from those lines for an upright face, image y pointing down): eyes at
(-E/2, 0) and (E/2, 0), mouth corners at (-W/2, M) and (W/2, M). Then eye_to_eye = (E, 0),
eye_to_mouth = (0, M), x points along +x with length s = max(2E, 1.8M), y = (0, s) points
down, c = (0, 0.1M), the top-left corner is (-s, 0.1M - s) and the side is 2s. A point p lands at
crop pixel (p - top_left) * size / (2s) - 0.5. The recipe only uses distances and directions,
so a rotated, scaled and shifted face lands at the same crop pixels.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from stmodel.align import align_face, ffhq_quad

SIZE = 1024
TOL_PX = 0.5  # the issue asks for 1 px; measured <= 0.07 px


def ffhq_template(e: float, m: float, w: float, size: int = SIZE) -> dict[str, tuple[float, float]]:
    """Crop pixel (u, v) of each point of an upright face with eye distance `e`, eye-to-mouth
    distance `m` and mouth width `w`, from the derivation in the module docstring."""
    s = max(2.0 * e, 1.8 * m)
    k = size / (2 * s)
    left, top = -s, 0.1 * m - s

    def px(x, y):
        return ((x - left) * k - 0.5, (y - top) * k - 0.5)

    return {"eye_left": px(-e / 2, 0.0), "eye_right": px(e / 2, 0.0),
            "mouth_left": px(-w / 2, m), "mouth_right": px(w / 2, m), "mouth": px(0.0, m)}


def test_template_helper_against_literal_numbers():
    # e = 180, m = 250, w = 160: s = max(360, 450) = 450, k = 1024 / 900; top-left (-450, -425).
    # left eye: x (450 - 90) * 1024/900 - 0.5 = 409.6 - 0.5, y 425 * 1024/900 - 0.5 = 483.5556 - 0.5
    # mouth:    x 450 * 1024/900 - 0.5 = 511.5,              y 675 * 1024/900 - 0.5 = 767.5
    t = ffhq_template(180, 250, 160)
    assert t["eye_left"] == pytest.approx((409.1, 483.0556), abs=1e-3)
    assert t["eye_right"] == pytest.approx((613.9, 483.0556), abs=1e-3)
    assert t["mouth"] == pytest.approx((511.5, 767.5), abs=1e-3)
    assert t["mouth_left"] == pytest.approx((420.4778, 767.5), abs=1e-3)  # 370 * 1024/900 - 0.5


def _render(points: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian dots (peak 255) centred on `points` (x, y in pixel-index coordinates)."""
    h, w = shape
    img = np.zeros((h, w), np.float64)
    r = int(math.ceil(4 * sigma))
    for x, y in points:
        x0, x1 = max(int(x) - r, 0), min(int(x) + r + 2, w)
        y0, y1 = max(int(y) - r, 0), min(int(y) + r + 2, h)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1] += 255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
    g = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def _dots(crop: np.ndarray) -> dict[str, tuple[float, float]]:
    """Find the four drawn dots in the crop (no use of where they should be): intensity-weighted
    centroids of the connected bright regions; the upper two are the eyes, the lower two the
    mouth corners, each pair ordered left to right."""
    g = crop[..., 0].astype(np.float64)
    labels, n = ndimage.label(g > 40)
    assert n == 4, f"expected 4 dots in the crop, found {n}"
    cents = ndimage.center_of_mass(g, labels, range(1, n + 1))  # (row, col)
    pts = sorted(((c, r) for r, c in cents), key=lambda p: p[1])
    eyes, mouth = sorted(pts[:2]), sorted(pts[2:])
    return {"eye_left": eyes[0], "eye_right": eyes[1], "mouth_left": mouth[0], "mouth_right": mouth[1],
            "mouth": tuple((np.asarray(mouth[0]) + np.asarray(mouth[1])) / 2)}


# (eye distance, eye-to-mouth, mouth width, rotation in degrees): eye-dominated (2E > 1.8M),
# mouth-dominated, and a big face whose quad (2016 px) makes the crop supersample 2x.
CASES = [(200.0, 190.0, 150.0, -15.0), (180.0, 250.0, 160.0, 25.0), (420.0, 560.0, 300.0, 10.0)]


@pytest.mark.parametrize("e,m,w,angle", CASES)
def test_landmarks_land_on_the_ffhq_template(e, m, w, angle):
    s = max(2 * e, 1.8 * m)
    # The upright face (nose between eyes and mouth; the recipe does not read it) ...
    face = np.array([[-e / 2, 0], [e / 2, 0], [0, 0.55 * m], [-w / 2, m], [w / 2, m]])
    # ... rotated and placed with the quad's centre in the middle of a canvas that holds the quad
    # and FFHQ's border (no reflection padding), at a non-integer offset.
    th = math.radians(angle)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    side = int(math.ceil(2 * s * math.sqrt(2) * 1.25)) + 40
    centre = np.array([side / 2 + 0.37, side / 2 - 0.21])
    lm = (face - [0, 0.1 * m]) @ rot.T + centre
    sigma = 3.0 * (2 * s) / SIZE  # about 3 crop pixels
    image = _render(lm[[0, 1, 3, 4]], (side, side), sigma)

    crop, quad = align_face(image, lm, size=SIZE)
    assert crop.shape == (SIZE, SIZE, 3)
    expected = ffhq_template(e, m, w)
    found = _dots(crop)
    err = {k: float(np.hypot(*(np.asarray(found[k]) - expected[k]))) for k in expected}
    print(f"\nE={e} M={m} angle={angle}: px error {err}")
    assert max(err.values()) < TOL_PX, (found, expected)


def test_reference_quad_against_hand_computation():
    # Tilted face, mouth term dominating.
    #   eye_avg = (480, 360), eye_to_eye = (160, 120), |.| = 200
    #   mouth_avg = (330, 560), eye_to_mouth = (-150, 200), |.| = 250
    #   flipud(eye_to_mouth) * [-1, 1] = (200, -150) * [-1, 1] = (-200, -150)
    #   x = (160, 120) - (-200, -150) = (360, 270); |x| = 450 -> (0.8, 0.6)
    #   scale = max(200 * 2.0, 250 * 1.8) = max(400, 450) = 450 -> x = (360, 270)
    #   y = flipud(x) * [-1, 1] = (-270, 360)
    #   c = (480, 360) + 0.1 * (-150, 200) = (465, 380)
    #   quad = c-x-y, c-x+y, c+x+y, c+x-y = (375, -250), (-165, 470), (555, 1010), (1095, 290)
    #   qsize = 2 * 450 = 900
    lm = [[400, 300], [560, 420], [470, 470], [282, 524], [378, 596]]
    quad, qsize = ffhq_quad(lm)
    np.testing.assert_allclose(quad, [[375, -250], [-165, 470], [555, 1010], [1095, 290]], atol=1e-9)
    assert qsize == pytest.approx(900.0, abs=1e-9)

    # Upright face, eye term dominating.
    #   eye_avg = (200, 100), eye_to_eye = (200, 0); mouth_avg = (200, 300), eye_to_mouth = (0, 200)
    #   x = (200, 0) - (200, 0) * [-1, 1] = (400, 0) -> (1, 0); scale = max(400, 360) = 400
    #   x = (400, 0), y = (0, 400), c = (200, 100) + (0, 20) = (200, 120)
    #   quad = (-200, -280), (-200, 520), (600, 520), (600, -280); qsize = 800
    lm = [[100, 100], [300, 100], [200, 200], [150, 300], [250, 300]]
    quad, qsize = ffhq_quad(lm)
    np.testing.assert_allclose(quad, [[-200, -280], [-200, 520], [600, 520], [600, -280]], atol=1e-9)
    assert qsize == pytest.approx(800.0, abs=1e-9)
