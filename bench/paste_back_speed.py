"""Benchmark of paste-back (not a test): seconds per face and peak RSS on a 12-MP photo.

    python -m bench.paste_back_speed                     # 4000x3000, face quad ~1000 px, crop 1024
    python -m bench.paste_back_speed --quad 400 --repeats 9

The photo is skimage's astronaut scaled so that its face quad has the asked side, rotated 12
degrees and placed off-centre on a 4000x3000 canvas; the crop is the face aligned at `--size`
and inverted (an "edit"). Prints one JSON line: median / min seconds of `paste_back` over the
repeats, the identity paste's face-core PSNR, and peak RSS (before and after the pastes).
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
from PIL import Image

from stmodel.align import align_face, paste_back, paste_mask

LM = np.array([[205.0, 101.7], [246.8, 103.7], [224.7, 129.0], [201.7, 139.2], [245.3, 141.9]])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_photo(quad_side: float, w: int = 4000, h: int = 3000, angle: float = 12.0):
    from skimage import data

    face = data.astronaut()
    s = quad_side / 167.4  # the astronaut's quad side at scale 1
    th = np.deg2rad(angle)
    a = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    t = np.array([w * 0.62, h * 0.45]) - a @ LM.mean(0)  # the face off-centre
    inv = np.linalg.inv(np.vstack([np.c_[a, t], [0, 0, 1]]))
    photo = Image.fromarray(face).transform((w, h), Image.Transform.AFFINE, tuple(inv[:2].flatten()),
                                            Image.Resampling.BICUBIC, fillcolor=(110, 130, 150))
    lm = LM @ a.T + t + a @ [0.5, 0.5] - 0.5  # index coordinates (PIL maps index + 0.5)
    return np.asarray(photo), lm


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quad", type=float, default=1000.0, help="face quad side in photo pixels")
    ap.add_argument("--size", type=int, default=1024, help="aligned crop size")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--jpeg", action="store_true", help="also time the stage's path on a 12-MP JPEG file")
    args = ap.parse_args(argv)

    photo, lm = make_photo(args.quad)
    crop, quad = align_face(photo, lm, size=args.size)
    edit = 255 - crop
    rss0 = peak_rss_mb()
    times = []
    for _ in range(max(1, args.repeats)):
        t = time.perf_counter()
        out = paste_back(photo, edit, quad)
        times.append(time.perf_counter() - t)
    rss1 = peak_rss_mb()
    del out
    ident = paste_back(photo, crop, quad)
    core = paste_mask(photo.shape, quad) == 1
    mse = np.mean((ident[core].astype(np.float64) - photo[core]) ** 2)
    res = {"bench": "paste_back", "photo": f"{photo.shape[1]}x{photo.shape[0]}", "crop": args.size,
           "quad_side": round(float(np.hypot(*(quad[3] - quad[0]))), 1), "repeats": len(times),
           "median_s": round(float(np.median(times)), 4), "min_s": round(float(np.min(times)), 4),
           "identity_core_psnr_db": round(float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10))), 2),
           "peak_rss_mb_before": round(rss0, 1), "peak_rss_mb": round(rss1, 1)}
    if args.jpeg:
        res.update(jpeg_path(photo, edit, quad, args.repeats))
    print(json.dumps(res))
    return res


def jpeg_path(photo: np.ndarray, edit: np.ndarray, quad: np.ndarray, repeats: int) -> dict:
    """The paste stage's calls for one face of a 12-MP JPEG, file to file."""
    import hashlib
    import io
    import os
    import tempfile

    from pipeline import storage
    from pipeline.config import defaults
    from pipeline.decode import decode_image
    from pipeline.paste_stage import PasteSettings, composite_psnr, encode_composite
    from pipeline.sections import PasteBackSection

    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=92)
    folder = tempfile.mkdtemp()
    src = os.path.join(folder, "photo.jpg")
    with open(src, "wb") as f:
        f.write(buf.getvalue())
    settings = PasteSettings(defaults(PasteBackSection), output=folder, folder="edits", member_columns=("edit_id",),
                             group_columns=(), crop_uri_column="edited_uri")
    pb = settings.section
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        data = storage.read_bytes(src)
        hashlib.sha256(data).hexdigest()
        d = decode_image(data, max_pixels=pb.max_pixels, min_side=1)
        comp = paste_back(d.rgb, edit, quad, feather=pb.feather, radii=pb.radii)
        composite_psnr(d.rgb, comp, [quad], settings)
        storage.write_bytes(os.path.join(folder, "composite.jpg"), encode_composite(comp, settings, None))
        times.append(time.perf_counter() - t)
    return {"jpeg_bytes": len(buf.getvalue()), "jpeg_path_median_s": round(float(np.median(times)), 3),
            "jpeg_path_min_s": round(float(np.min(times)), 3), "jpeg_peak_rss_mb": round(peak_rss_mb(), 1)}


if __name__ == "__main__":
    main()
