"""Every input accounted: what the listing leaves out (only our bookkeeping), the byte cap
checked from the listing before reading, the allow-list of formats (checked on the opened
image, not the name) and the multi-frame policy, in jobs.align (photos) and jobs.invert (a plain
folder of crops)."""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from jobs import align, invert
from jobs.cli import load_config
from pipeline import delta, storage
from pipeline.decode import decode_image, image_id
from pipeline.inputs import split_by_size, unread_id
from tests.conftest import write_crops


def encode(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def animated_gif(n: int = 3, size: int = 64) -> bytes:
    frames = [Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def noise_png(size: int, seed: int = 0) -> bytes:
    """A PNG that does not compress: about 3 x size^2 bytes."""
    return encode(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8), "PNG")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def _put(root, name: str, data: bytes) -> str:
    path = os.path.join(str(root), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ------------------------------------------------------------------------------------------------
# listing, byte cap, formats, frames (no Ray)

def test_listing_skips_only_our_bookkeeping(tmp_path):
    keep = ["_DSC0001.JPG", "_MG_0042.jpg", "holiday/_DSC0002.JPG", "a.png"]
    skip = [".DS_Store", "._DSC0001.JPG", ".git/config", "_runs/r.json", "faces/_delta_log/0.json",
            "faces/part-0.parquet", "a.png.tmp-0123abcd", "aligned/x_0.png"]
    for name in keep + skip:
        _put(tmp_path, name, b"x" * 10)
    got = storage.list_sized(str(tmp_path))
    assert [os.path.relpath(u, tmp_path) for u, _ in got] == sorted(keep)
    assert all(size == 10 for _, size in got)
    # `aligned/` is one of our output folders only under a dataset root (a folder with _runs/)
    plain = tmp_path / "plain"
    _put(plain, "aligned/x.png", b"y")
    assert [os.path.relpath(u, plain) for u in storage.list_files(str(plain))] == ["aligned/x.png"]


def test_byte_cap_splits_the_listing_before_reading():
    sized = [("s3://b/small.jpg", 100), ("s3://b/big.jpg", 101), ("s3://b/unknown.jpg", None)]
    assert split_by_size(sized, 100) == (["s3://b/small.jpg", "s3://b/unknown.jpg"], [("s3://b/big.jpg", 101)])
    assert split_by_size(sized, 0) == (["s3://b/small.jpg", "s3://b/big.jpg", "s3://b/unknown.jpg"], [])


def test_formats_are_checked_on_the_opened_image_and_multi_frame_has_a_policy(astronaut):
    ico = decode_image(encode(Image.fromarray(astronaut).resize((64, 64)), "ICO"))
    assert ico.status == "unsupported_format" and "ICO" in ico.error and "allowed formats" in ico.error
    assert decode_image(b"%PDF-1.4\n%binary\n1 0 obj").status == "decode_error"
    assert decode_image(encode(astronaut, "PNG"), formats=["JPEG"]).status == "unsupported_format"
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF"):
        assert decode_image(encode(astronaut, fmt)).status == "ok", fmt
    gif = animated_gif(3)
    refused = decode_image(gif)
    assert refused.status == "multi_frame" and "3 frames" in refused.error and refused.image is None
    first = decode_image(gif, multi_frame="first")
    assert first.status == "ok" and first.frames == 3 and first.image.shape == (64, 64, 3)
    pages = io.BytesIO()
    Image.fromarray(astronaut).save(pages, format="TIFF", save_all=True, append_images=[Image.fromarray(astronaut)])
    assert decode_image(pages.getvalue()).status == "multi_frame"
    assert decode_image(encode(astronaut, "GIF")).status == "ok"  # one frame: a photo like any other


# ------------------------------------------------------------------------------------------------
# the jobs (Ray)

def test_align_accounts_for_camera_names_and_refusals(ray_local, tmp_path, astronaut):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    photo = encode(astronaut, "JPEG", quality=92)
    files = {
        "_DSC0001.JPG": (photo, "ok"),
        "big.png": (noise_png(300), "too_large"),                     # ~270 kB > max_bytes
        "icon.jpg": (encode(Image.fromarray(astronaut).resize((64, 64)), "ICO"), "unsupported_format"),
        "notes.jpg": (b"this is a text file, not a photo\n", "decode_error"),
        "animated.gif": (animated_gif(3, 128), "multi_frame"),
    }
    for name, (data, _) in files.items():
        _put(inp, name, data)
    _put(inp, ".DS_Store", b"\0" * 16)
    cfg = load_config(align.SETTINGS, None, [f"input={inp}", f"output={out}", "align.size=256",
                                              "align.max_bytes=200000", "progress=false"])
    res = align.run(cfg)
    assert res["counts"] == {"in": 5, "ok": 1, "failed": 4, "skipped": 0}
    t = delta.read_snapshot_arrow(out, "faces")
    by_name = {os.path.basename(r["source_uri"]): r for r in t.to_pylist()}
    assert {n: r["status"] for n, r in by_name.items()} == {n: st for n, (_, st) in files.items()}
    assert by_name["_DSC0001.JPG"]["image_id"] == image_id(photo)
    big = by_name["big.png"]
    assert big["image_id"] == unread_id(str(inp / "big.png")) and "max_bytes 200000" in big["error"]
    assert "ICO" in by_name["icon.jpg"]["error"] and "3 frames" in by_name["animated.gif"]["error"]
    # Rerun: every refusal is permanent, so each file is skipped (the unread one by its URI)
    again = align.run(cfg)
    assert again["counts"] == {"in": 5, "ok": 0, "failed": 0, "skipped": 5}


def test_invert_plain_folder_refusals_are_rows(ray_local, tmp_path, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    crops = tmp_path / "crops"
    good = write_crops(crops, 2, seed=21, prefix="_crop")
    _put(crops, "big.png", noise_png(128))
    _put(crops, "anim.png", animated_gif(2))  # a GIF under a .png name: the opened format counts
    _put(crops, "icon.png", encode(Image.fromarray(np.zeros((32, 32, 3), np.uint8)), "ICO"))
    out = str(tmp_path / "ds")
    cfg = load_config(invert.SETTINGS, None, [f"input={crops}", f"output={out}", f"model.checkpoint={ckpt}",
                                               "invert.batch_size=4", "invert.max_bytes=30000", "progress=false"])
    res = invert.run(cfg)
    assert res["counts"] == {"in": 5, "ok": 2, "failed": 3, "skipped": 0}
    t = delta.read_snapshot_arrow(out, "latents")
    by_name = {os.path.basename(r["source_uri"]): r["status"] for r in t.to_pylist()}
    assert by_name == {os.path.basename(good[0]): "ok", os.path.basename(good[1]): "ok", "big.png": "too_large",
                       "anim.png": "multi_frame", "icon.png": "unsupported_format"}
    assert t.filter(pc.equal(t["status"], "too_large"))["w_plus"].null_count == 1


def test_a_crop_that_cannot_be_read_is_a_read_error_row_keyed_by_its_uri(tmp_path):
    from pipeline.images import load_crops, read_crops

    good = write_crops(tmp_path / "c", 1, seed=3)[0]
    gone = str(tmp_path / "c" / "vanished.png")  # listed, then deleted before the read
    rows = read_crops({"uri": np.array([good, gone], dtype=object)})
    assert list(rows["status"]) == ["ok", "read_error"]
    assert rows["image_id"][0] == image_id(open(good, "rb").read())
    assert rows["image_id"][1] == unread_id(gone) and "vanished.png" in rows["error"][1]
    assert rows["bytes"][1] is None and list(rows["source_uri"]) == [good, gone]
    loaded = load_crops(rows, input_size=32, target_size=None, max_pixels=64_000_000)
    assert list(loaded["status"]) == ["ok", "read_error"] and "bytes" not in loaded
    assert np.abs(loaded["image"][0]).sum() > 0 and not loaded["image"][1].any()
