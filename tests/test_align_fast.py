"""The align stage's fast path for camera photos: JPEGs decoded at reduced scale (DCT scaling),
detection on those pixels, and a finer window decoded again only where a crop needs it.

Thresholds (measured on skimage's astronaut scaled 2.6-4x into a 3200x2400 textured JPEG, 256 px
crops, MTCNN on CPU):
- the same quad cropped from the reduced / window pixels and from the full-resolution decode:
  >= 40 dB (observed 44-48 dB);
- the whole fast path against the same stage fed full-resolution pixels: refined landmarks
  within 1.5 % of the quad side (observed 0.3-0.9 %), which is MTCNN's own jitter; the crops
  then agree to >= 20 dB (observed 21-32 dB), as in tests/test_align.py's detected cases;
- both paths' quads against the ground truth (the astronaut's own refined landmarks carried
  through the known placement): within 3 % of the side (observed 0.6-1.9 %, the two paths alike).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.align_stage import DRAFT_SIDE, AlignFaces, decode_batch, encode_crop_png, needed_reduction
from pipeline.config import parse
from pipeline.decode import decode_image, decode_region
from pipeline.schemas import nested_list_to_numpy
from pipeline.sections import AlignSection
from stmodel.align import crop_from_quad, ffhq_quad

SIZE = 256
W, H = 3200, 2400          # reduced 2x by the decode stage (longer side 1600 >= DRAFT_SIDE)
PSNR_SAME_QUAD_DB = 40.0
PSNR_PATHS_DB = 20.0
LM_PATHS_MAX = 0.015
QUAD_TRUTH_MAX = 0.03


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def jpeg(a: np.ndarray, orientation: int = 1, quality: int = 90) -> bytes:
    """JPEG bytes of the upright photo `a`, stored rotated so that EXIF `orientation` shows it
    upright again (1, 3, 6, 8)."""
    kw = {}
    if orientation != 1:
        a = np.rot90(a, {6: 1, 8: -1, 3: 2}[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def camera_photo(astronaut, scale: float, angle: float, offset, seed: int = 0, size=(W, H)):
    """The astronaut resized to 512*scale, rotated by `angle` degrees, pasted at `offset` on a
    textured, noisy canvas; returns the upright photo and the map astronaut px -> photo px."""
    rng = np.random.default_rng(seed)
    w, h = size
    bg = Image.fromarray(rng.integers(30, 226, (9, 12, 3)).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    side = int(512 * scale)
    face = Image.fromarray(astronaut).resize((side, side), Image.Resampling.BICUBIC)
    bg.paste(face.rotate(angle, Image.Resampling.BICUBIC, fillcolor=(128, 128, 128)), tuple(offset))
    a = np.asarray(bg, dtype=np.int16) + rng.integers(-6, 7, (h, w, 1), dtype=np.int16)
    t = -np.deg2rad(angle)
    rot = np.linalg.inv(np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]))

    def placed(points):
        p = (np.asarray(points, dtype=np.float64).reshape(-1, 2) + 0.5) * side / 512.0
        return (p - side / 2.0) @ rot.T + side / 2.0 - 0.5 + np.asarray(offset, dtype=np.float64)

    return np.clip(a, 0, 255).astype(np.uint8), placed


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def photos(astronaut):
    """name -> (upright photo, JPEG bytes, placement). `big`: quad ~670 px, enough at 1/2 scale
    for 256 crops; `small`: quad ~440 px, so the crop's window is decoded again at full size."""
    out = {}
    for name, scale, angle, offset in (("big", 4.0, 12.0, (900, 300)), ("small", 2.6, -8.0, (1700, 900))):
        up, placed = camera_photo(astronaut, scale, angle, offset, seed=len(out))
        out[name] = (up, jpeg(up), placed)
    return out


def new_stage(root, **section) -> AlignFaces:
    return AlignFaces(parse(AlignSection, {"size": SIZE, "num_cpus": 1, **section}), str(root), "run-fast")


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    return new_stage(tmp_path_factory.mktemp("fast"))


def run_stage(stage, datas: list[bytes], **decode_kw) -> dict:
    batch = decode_batch({"path": np.array([f"p{i}.jpg" for i in range(len(datas))], dtype=object),
                          "bytes": np.array(datas, dtype=object)}, stage.section, **decode_kw)
    t = stage(batch)
    return {"batch": batch, "status": t["status"].to_pylist(), "quad": nested_list_to_numpy(t["quad"]),
            "landmarks": nested_list_to_numpy(t["landmarks"]), "uri": t["aligned_uri"].to_pylist(),
            "width": t["width"].to_pylist(), "height": t["height"].to_pylist()}


def read_png(uri: str) -> np.ndarray:
    with Image.open(uri) as im:
        return np.asarray(im.convert("RGB"))


def side_of(q) -> float:
    return float(np.hypot(*(q[3] - q[0])))


# ------------------------------------------------------------------------------------------------
# decoding at reduced scale, and of a window

def test_reduced_decode_maps_its_pixels_onto_the_photo(photos):
    up, data, _ = photos["big"]
    d = decode_image(data, min_long_side=DRAFT_SIDE)
    assert d.status == "ok" and (d.width, d.height) == (W, H)              # the photo's own size
    assert d.image.shape == (H // 2, W // 2, 3) and d.pixel_map == (2.0, 0.5, 0.5)
    full = decode_image(data).image
    assert full.shape == (H, W, 3) and decode_image(data).pixel_map == (1.0, 0.0, 0.0)
    blocks = full.reshape(H // 2, 2, W // 2, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert psnr(d.image, blocks) >= 35.0                                   # 2x2 block averages
    small = decode_image(jpeg(up[:600, :800]), min_long_side=DRAFT_SIDE)   # too small to reduce
    assert small.pixel_map == (1.0, 0.0, 0.0) and small.image.shape == (600, 800, 3)


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_window_decode_is_the_full_decode_cut_out_for_every_orientation(astronaut, orientation):
    stored = np.ascontiguousarray(astronaut[:300, :410])   # sides that are no multiple of 2, 4, 8
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="PNG", exif=exif)
    data = buf.getvalue()
    whole = decode_image(data)
    assert whole.status == "ok"
    h, w = whole.image.shape[:2]
    assert (w, h) == ((300, 410) if orientation >= 5 else (410, 300))
    for box in [(10.2, 20.7, 120.1, 200.0), (-50, -50, 40, 30), (w - 60, h - 70, w + 90, h + 5)]:
        d = decode_region(data, 1, box)
        a, bx, by = d.pixel_map
        u0, v0 = int(bx), int(by)
        assert a == 1.0 and (d.width, d.height) == (w, h)
        hh, ww = d.image.shape[:2]
        np.testing.assert_array_equal(d.image, whole.image[v0:v0 + hh, u0:u0 + ww])
        assert u0 <= max(box[0], 0) and v0 <= max(box[1], 0)              # the window holds the box
        assert u0 + ww >= min(box[2], w - 1) and v0 + hh >= min(box[3], h - 1)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_reduced_pixels_land_where_the_full_resolution_ones_are(astronaut, orientation):
    """Odd sizes (3203 x 2401): along a flipped axis the partial last 2x2 block comes first;
    pixel_map must account for it (else every reduced pixel is off by one full pixel)."""
    up, _ = camera_photo(astronaut, 3.0, 0.0, (800, 500), size=(3203, 2401))
    data = jpeg(up, orientation)
    full = decode_image(data).image
    for d in (decode_image(data, min_long_side=DRAFT_SIDE), decode_region(data, 2, (1000, 700, 1800, 1500))):
        a, bx, by = d.pixel_map
        assert a == 2.0 and (d.width, d.height) == (3203, 2401)
        hh, ww = d.image.shape[:2]
        ys, xs = np.rint(by + a * np.arange(hh) - 0.5).astype(int), np.rint(bx + a * np.arange(ww) - 0.5).astype(int)
        inner = (ys[:, None] >= 0) & (ys[:, None] < 2400) & (xs[None, :] >= 0) & (xs[None, :] < 3202)
        f = full.astype(np.float64)
        ycl, xcl = np.clip(ys, 0, 2399), np.clip(xs, 0, 3201)
        blocks = (f[ycl][:, xcl] + f[ycl + 1][:, xcl] + f[ycl][:, xcl + 1] + f[ycl + 1][:, xcl + 1]) / 4
        ok = psnr(d.image[inner], blocks[inner])
        shifted = psnr(d.image[inner][:-1], blocks[inner][1:])
        assert ok >= 32.0 and ok > shifted + 3.0, (ok, shifted)


def test_needed_reduction():
    assert needed_reduction(2100, 256) == 8 and needed_reduction(1000, 256) == 2
    assert needed_reduction(1024, 256) == 4 and needed_reduction(300, 256) == 1
    assert needed_reduction(5000, 1024) == 4


# ------------------------------------------------------------------------------------------------
# the stage: fast path against the full-resolution path

def test_fast_path_crops_match_the_full_resolution_path(astronaut, photos, stage, tmp_path, monkeypatch):
    import pipeline.align_stage as st

    windows = []
    real = st.decode_region
    monkeypatch.setattr(st, "decode_region", lambda *a, **k: windows.append(a[1]) or real(*a, **k))
    names = ["big", "small"]
    fast = run_stage(stage, [photos[n][1] for n in names])
    monkeypatch.setattr(st, "decode_region", real)
    full = run_stage(new_stage(tmp_path), [photos[n][1] for n in names], draft_side=None)  # its own crops
    assert list(fast["batch"]["pixel_map"][:, 0]) == [2.0, 2.0] and list(full["batch"]["pixel_map"][:, 0]) == [1.0, 1.0]
    assert windows == [1]                        # only the small face needed finer pixels: its window at 1/1
    det = stage.detector
    ref = det.refine([astronaut], [det.detect([astronaut])[0].landmarks[:1]])[0][0]
    report = []
    for i, name in enumerate(names):
        assert fast["status"][i] == full["status"][i] == "ok"
        assert (fast["width"][i], fast["height"][i]) == (W, H)
        side = side_of(full["quad"][i])
        lm = np.linalg.norm(fast["landmarks"][i] - full["landmarks"][i], axis=1).mean() / side
        crop = read_png(fast["uri"][i])
        same = psnr(crop, crop_from_quad(decode_image(photos[name][1]).image, fast["quad"][i], SIZE))
        paths = psnr(crop, read_png(full["uri"][i]))
        truth, _ = ffhq_quad(photos[name][2](ref))
        errs = [np.linalg.norm(r["quad"][i] - truth, axis=1).max() / side_of(truth) for r in (fast, full)]
        report.append((name, round(float(lm), 4), round(same, 1), round(paths, 1), [round(float(e), 4) for e in errs]))
        assert lm <= LM_PATHS_MAX, report
        assert same >= PSNR_SAME_QUAD_DB, report
        assert paths >= PSNR_PATHS_DB, report
        assert max(errs) <= QUAD_TRUTH_MAX, report
    print("name, landmarks fast-full / side, same-quad dB, fast-full dB, quad error vs truth (fast, full):",
          *report, sep="\n  ")


@pytest.mark.parametrize("orientation", [6, 3, 8])
def test_exif_orientation_is_honoured(photos, stage, orientation):
    up, upright_jpeg, _ = photos["big"]
    res = run_stage(stage, [upright_jpeg, jpeg(up, orientation)])
    assert res["status"] == ["ok", "ok"]
    assert (res["width"][1], res["height"][1]) == (W, H)                   # the upright size
    q0, q1 = res["quad"]
    # The same face, upright: as close as two detections of it can be (the rotated file is
    # another JPEG encoding of the photo; observed 0.6-2.1 % of the side).
    assert np.linalg.norm(q1 - q0, axis=1).max() / side_of(q0) <= QUAD_TRUTH_MAX
    assert psnr(read_png(res["uri"][0]), read_png(res["uri"][1])) >= PSNR_PATHS_DB


def test_small_images_and_png_inputs_still_work(astronaut, photos, stage):
    up = photos["small"][0]
    png = io.BytesIO()
    Image.fromarray(up).save(png, format="PNG", compress_level=1)
    small = jpeg(astronaut)
    res = run_stage(stage, [small, png.getvalue()])
    b = res["batch"]
    assert res["status"] == ["ok", "ok"]
    assert b["pixel_map"].tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]  # decoded at full size
    assert list(b["bytes"]) == [b"", b""]                                  # nothing kept to decode again
    assert b["image"][1].shape == (H, W, 3) and (res["width"][1], res["height"][1]) == (W, H)
    ref = run_stage(stage, [photos["small"][1]])                           # the same photo as a JPEG
    assert np.linalg.norm(res["quad"][1] - ref["quad"][0], axis=1).max() / side_of(ref["quad"][0]) <= LM_PATHS_MAX * 2
    for uri in res["uri"]:
        assert read_png(uri).shape == (SIZE, SIZE, 3)


def test_crop_png_is_lossless(astronaut):
    crop = np.ascontiguousarray(astronaut[100:356, 120:376])
    with Image.open(io.BytesIO(encode_crop_png(crop, 1))) as im:
        np.testing.assert_array_equal(np.asarray(im), crop)


def test_the_face_aligned_is_the_one_that_passed_min_score(astronaut, tmp_path, monkeypatch):
    """A larger detection below min_score (a false positive, sorted first by area) is neither
    counted nor aligned: face_index 0 is the largest face that passed."""
    from stmodel.detect import Faces

    stage = new_stage(tmp_path)
    real = stage._detect

    def with_a_weak_giant(images):
        out = []
        for f in real(images):
            giant = np.array([[0, 0, 500, 500]], np.float32)
            out.append(Faces(np.concatenate([giant, f.boxes]), np.concatenate([[0.8], f.scores]).astype(np.float32),
                             np.concatenate([f.landmarks[:1] * 0 + [[[100, 150], [400, 150], [250, 260], [130, 380],
                                                                      [370, 380]]], f.landmarks]).astype(np.float32)))
        return out

    good = run_stage(stage, [jpeg(astronaut)])
    monkeypatch.setattr(stage, "_detect", with_a_weak_giant)
    res = run_stage(stage, [jpeg(astronaut, quality=91)])
    assert res["status"] == ["ok"]
    np.testing.assert_allclose(res["quad"][0], good["quad"][0], atol=0.02 * side_of(good["quad"][0]))


def test_detection_gets_finer_pixels_when_detect_max_side_asks_for_them(photos, tmp_path, monkeypatch):
    """detect_max_side above what the decode stage kept: the detection copy is decoded again
    from the file (here at full size) instead of being upscaled."""
    stage = new_stage(tmp_path, detect_max_side=2400)
    seen = []
    real = stage.detector.detect
    monkeypatch.setattr(stage.detector, "detect", lambda images, **kw: seen.append(
        [im.shape for im in images]) or real(images, **kw))
    res = run_stage(stage, [photos["big"][1]])
    assert res["status"] == ["ok"] and seen[0] == [(H, W, 3)]
