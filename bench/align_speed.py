"""Benchmark of the align stage (not a test): faces per second on this machine.

    python -m bench.align_speed                      # 16 photos, sizes 256 and 1024, CPU
    python -m bench.align_speed --n 32 --sizes 1024 --ray   # also the whole job on local Ray
    python -m bench.align_speed --device cuda
    python -m bench.align_speed --camera             # 32 camera-sized JPEGs: the job vs a plain loop

Photos are skimage's astronaut rotated / scaled / placed on 1024x768 and 512x512 canvases (one
face each). `stage` runs `AlignFaces` in this process on decoded batches and splits the time
into detect, refine, crop (FFHQ transform) and PNG encode+write; `decode` times the decode
stage on the encoded JPEGs; `ray` (optional) runs `jobs.align` end to end on local Ray (job
seconds, Ray start-up excluded). One JSON line per measurement, then a table.

`--camera`: camera photos, 4000x3000 JPEG (quality 90) by default (`--width`, `--height`): the
astronaut scaled 3-5x (a face of 270-450 px, its FFHQ quad 500-840 px), rotated up to 15
degrees, on a textured background with sensor-like noise; every 4th photo is stored rotated
with an EXIF orientation tag (6, 8, 3) that shows it upright. In one run:
  plain   a plain single-process loop: full-resolution decode (EXIF applied), facenet-pytorch
          MTCNN (its defaults) on the whole photo, one PIL QUAD transform of the FFHQ quad to
          the output size, PNG write (Pillow's defaults); torch's default thread count; every
          photo once, in `--repeats` shares, each right after one job run
  job     `jobs.align` on local Ray with default settings but `align.size` (`--repeats` runs,
          each a fresh output; its own `seconds` from the run record: Ray start-up excluded;
          the median counts)
  stage   decode (reduced, and full for comparison) and `AlignFaces` in this process, ms/photo
  accuracy (first `--accuracy-n` photos) the job's path (reduced decode, finer window only
          where the crop needs it) against the same stage fed full-resolution pixels: refined
          landmark distance, crop PSNR, and the PSNR of the same quad cropped from both.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image


def make_photos(n: int, seed: int = 0) -> list[bytes]:
    from skimage import data

    rng = np.random.default_rng(seed)
    face = Image.fromarray(data.astronaut())
    out = []
    for i in range(n):
        big = i % 2 == 0
        canvas = Image.new("RGB", (1024, 768) if big else (512, 512), tuple(int(v) for v in rng.integers(60, 200, 3)))
        s = rng.uniform(0.9, 1.4) if big else rng.uniform(0.6, 0.9)
        im = face.resize((int(512 * s), int(512 * s)), Image.Resampling.BICUBIC)
        im = im.rotate(float(rng.uniform(-20, 20)), Image.Resampling.BICUBIC, expand=False, fillcolor=(128, 128, 128))
        x = int(rng.integers(0, max(1, canvas.size[0] - im.size[0])))
        y = int(rng.integers(0, max(1, canvas.size[1] - im.size[1])))
        canvas.paste(im, (x, y))
        buf = io.BytesIO()
        canvas.save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def align_section(size: int, threads: int):
    """The job's align settings at their defaults but the crop size and the torch threads."""
    from pipeline.config import parse
    from pipeline.sections import AlignSection

    return parse(AlignSection, {"size": size, "num_cpus": threads})


def bench_stage(photos: list[bytes], size: int, device: str, batch: int, out_dir: str, threads: int) -> dict:
    import torch

    from pipeline import storage
    from pipeline.align_stage import AlignFaces, aligned_key, decode_batch, encode_crop_png, select_faces
    from stmodel.align import align_face

    a = align_section(size, threads)
    paths = np.array([f"mem/{i}.jpg" for i in range(len(photos))], dtype=object)
    t = time.perf_counter()
    dec = decode_batch({"path": paths, "bytes": np.array(photos, dtype=object)}, a)
    t_decode = time.perf_counter() - t

    stage = AlignFaces(a, out_dir, "bench", device=device, detect_batch=batch)
    det = stage.detector
    images = [np.asarray(im) for im in dec["image"]]
    stage({k: v[:batch] for k, v in dec.items()})  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()

    parts = {"detect": 0.0, "refine": 0.0, "crop": 0.0, "png_write": 0.0}
    n_faces = 0
    t_all = time.perf_counter()
    for s in range(0, len(images), batch):
        chunk = images[s:s + batch]
        t = time.perf_counter()
        found = det.detect(chunk)
        parts["detect"] += time.perf_counter() - t
        keep = [select_faces(f, a.face_policy, a.min_score, a.min_face_px, a.max_faces)[3] for f in found]
        t = time.perf_counter()
        lms = det.refine(chunk, [f.landmarks[f.scores >= 0.9][k] for f, k in zip(found, keep)])  # k: among those
        parts["refine"] += time.perf_counter() - t
        for j, (img, lm) in enumerate(zip(chunk, lms)):
            for k in range(len(lm)):
                t = time.perf_counter()
                crop, _ = align_face(img, lm[k], size=size)
                parts["crop"] += time.perf_counter() - t
                t = time.perf_counter()
                iid = str(dec["image_id"][s + j])
                storage.write_bytes(storage.join(out_dir, aligned_key(iid, k)),
                                    encode_crop_png(crop, a.png_compress_level))
                parts["png_write"] += time.perf_counter() - t
                n_faces += 1
    total = time.perf_counter() - t_all

    # The class itself, as Ray calls it (one call per batch).
    t = time.perf_counter()
    rows = 0
    for s in range(0, len(images), batch):
        sub = {k: v[s:s + batch] for k, v in dec.items()}
        rows += stage(sub).num_rows
    t_call = time.perf_counter() - t
    return {"mode": "stage", "size": size, "device": device, "photos": len(photos), "faces": n_faces,
            "faces_per_s": round(n_faces / total, 2), "faces_per_s_call": round(rows / t_call, 2),
            "decode_photos_per_s": round(len(photos) / t_decode, 2),
            "ms_per_face": {k: round(1000 * v / max(n_faces, 1), 1) for k, v in parts.items()},
            "torch_threads": torch.get_num_threads()}


def bench_ray(photos: list[bytes], size: int, device: str, workdir: str, concurrency: int) -> dict:
    import ray

    from jobs import align
    from jobs.cli import init_ray, load_config

    inp = os.path.join(workdir, f"in{size}")
    os.makedirs(inp, exist_ok=True)
    for i, b in enumerate(photos):
        with open(os.path.join(inp, f"{i:04d}.jpg"), "wb") as f:
            f.write(b)
    out = os.path.join(workdir, f"out{size}")
    cfg = load_config(align.SETTINGS, None, [f"input={inp}", f"output={out}", f"align.size={size}",
                                             f"align.device={device}", f"align.concurrency={concurrency}",
                                             "progress=false"])
    init_ray(cfg)
    t = time.perf_counter()
    res = align.run(cfg)
    secs = time.perf_counter() - t
    faces = res["extra"]["faces"]
    return {"mode": "ray", "size": size, "device": device, "photos": len(photos), "faces": faces,
            "actors": concurrency, "cpus": ray.cluster_resources().get("CPU"), "seconds": round(secs, 2),
            "faces_per_s": round(faces / secs, 2)}


# ------------------------------------------------------------------------------------------------
# camera photos: the job against a plain loop

ORIENTATIONS = (6, 8, 3)  # EXIF tag of every 4th photo; the stored pixels are rotated to match


def make_camera_photo(i: int, width: int = 4000, height: int = 3000, seed: int = 0,
                      quality: int = 90) -> tuple[bytes, dict]:
    """One camera-sized JPEG and where the astronaut went: {"side", "angle", "offset"} (the
    512 px image resized to side x side, rotated by angle degrees about its centre, pasted at
    offset, in the upright photo)."""
    from skimage import data

    rng = np.random.default_rng(seed * 100_003 + i)
    low = rng.integers(30, 226, (12, 16, 3)).astype(np.uint8)
    bg = Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)
    side = int(512 * float(rng.uniform(3.0, 5.0)) * min(width / 4000, height / 3000))
    angle = float(rng.uniform(-15, 15))
    face = Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BICUBIC)
    face = face.rotate(angle, Image.Resampling.BICUBIC, fillcolor=(128, 128, 128))
    offset = (int(rng.integers(0, max(1, width - side))), int(rng.integers(0, max(1, height - side))))
    bg.paste(face, offset)
    a = np.asarray(bg, dtype=np.int16)
    tex = 8 * np.sin(np.arange(width)[None, :] / (7 + i % 5)) * np.cos(np.arange(height)[:, None] / 11)
    tex = tex.astype(np.int16)
    a = a + tex[..., None] + rng.integers(-6, 7, (height, width, 1), dtype=np.int16)  # texture + sensor noise
    photo = np.clip(a, 0, 255).astype(np.uint8)
    kw = {}
    if i % 4 == 3:
        o = ORIENTATIONS[(i // 4) % len(ORIENTATIONS)]
        photo = np.rot90(photo, {6: 1, 8: -1, 3: 2}[o])  # stored so that the tag shows it upright
        exif = Image.Exif()
        exif[0x0112] = o
        kw["exif"] = exif
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(photo)).save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue(), {"side": side, "angle": angle, "offset": list(offset)}


def placed(points, meta: dict) -> np.ndarray:
    """Pixel coordinates in the 512 px astronaut -> in the photo (the placement of meta)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2) + 0.5       # continuous coordinates
    p = p * meta["side"] / 512.0
    c = np.array([meta["side"] / 2.0] * 2)
    t = -np.deg2rad(meta["angle"])
    inv = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])  # what Image.rotate samples with
    p = (p - c) @ np.linalg.inv(inv).T + c
    return p - 0.5 + np.asarray(meta["offset"], dtype=np.float64)


def camera_photos(n: int, width: int, height: int, cache: str | None = None) -> tuple[list[bytes], list[dict]]:
    photos, metas = [], []
    for i in range(n):
        path = os.path.join(cache, f"camera_{width}x{height}_{i:04d}.jpg") if cache else None
        if path and os.path.exists(path) and os.path.exists(path + ".json"):
            with open(path, "rb") as f:
                photos.append(f.read())
            with open(path + ".json") as f:
                metas.append(json.load(f))
            continue
        b, meta = make_camera_photo(i, width, height)
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(b)
            with open(path + ".json", "w") as f:
                json.dump(meta, f)
        photos.append(b)
        metas.append(meta)
    return photos, metas


def plain_loop(photos: list[bytes], size: int, out_dir: str) -> dict:
    """Full-resolution decode + facenet-pytorch MTCNN on the whole photo + PIL QUAD + PNG."""
    import torch
    from facenet_pytorch import MTCNN
    from PIL import ImageOps

    from stmodel.align import ffhq_quad

    os.makedirs(out_dir, exist_ok=True)
    mtcnn = MTCNN(keep_all=True, device="cpu")
    parts = {"decode": 0.0, "detect": 0.0, "crop_png": 0.0}
    aligned = 0
    t_all = time.perf_counter()
    for i, b in enumerate(photos):
        t = time.perf_counter()
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(b))).convert("RGB")
        parts["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        boxes, probs, points = mtcnn.detect(img, landmarks=True)
        parts["detect"] += time.perf_counter() - t
        t = time.perf_counter()
        if boxes is not None and len(boxes):
            quad, _ = ffhq_quad(points[0])  # facenet-pytorch sorts by size: the largest face
            crop = img.transform((size, size), Image.Transform.QUAD, tuple((quad + 0.5).flatten()),
                                 Image.Resampling.BILINEAR)
            crop.save(os.path.join(out_dir, f"{i:04d}.png"))
            aligned += 1
        parts["crop_png"] += time.perf_counter() - t
    total = time.perf_counter() - t_all
    n = len(photos)
    return {"mode": "plain", "size": size, "photos": n, "aligned": aligned, "seconds": round(total, 2),
            "photos_per_s": round(n / total, 3), "ms_per_photo": {k: round(1000 * v / n) for k, v in parts.items()},
            "torch_threads": torch.get_num_threads()}


def camera_job(photos: list[bytes], size: int, workdir: str, tag: str) -> dict:
    from jobs import align
    from jobs.cli import init_ray, load_config
    from pipeline import storage

    inp = os.path.join(workdir, "camera_in")
    if not os.path.isdir(inp):
        os.makedirs(inp)
        for i, b in enumerate(photos):
            with open(os.path.join(inp, f"{i:04d}.jpg"), "wb") as f:
                f.write(b)
    out = os.path.join(workdir, f"camera_out_{tag}")
    cfg = load_config(align.SETTINGS, None, [f"input={inp}", f"output={out}", f"align.size={size}", "progress=false"])
    init_ray(cfg)
    t = time.perf_counter()
    res = align.run(cfg)
    wall = time.perf_counter() - t
    with open(storage.join(out, storage.RUNS_DIR, f"{res['run_id']}.json")) as f:
        seconds = float(json.load(f)["summary"]["seconds"])
    n = len(photos)
    return {"mode": "job", "run": tag, "size": size, "photos": n, "aligned": res["counts"]["ok"],
            "faces": res["extra"]["faces"], "seconds": seconds, "wall_in_python": round(wall, 2),
            "photos_per_s": round(n / seconds, 3)}


def camera_stage(photos: list[bytes], size: int, out_dir: str) -> dict:
    """The decode stage (reduced, and full for comparison) and AlignFaces in this process."""
    from pipeline.align_stage import AlignFaces, decode_batch

    a = align_section(size, 1)
    n = len(photos)
    paths = np.array([f"mem/{i}.jpg" for i in range(n)], dtype=object)
    raw = {"path": paths, "bytes": np.array(photos, dtype=object)}
    t = time.perf_counter()
    for s in range(0, n, 8):
        decode_batch({k: v[s:s + 8] for k, v in raw.items()}, a, draft_side=None)
    t_full = time.perf_counter() - t
    t = time.perf_counter()
    dec = decode_batch(raw, a)
    t_dec = time.perf_counter() - t
    stage = AlignFaces(a, out_dir, "bench")
    t = time.perf_counter()
    ok = 0
    for s in range(0, n, 8):
        ok += sum(r == "ok" for r in stage({k: v[s:s + 8] for k, v in dec.items()}).column("status").to_pylist())
    t_align = time.perf_counter() - t
    return {"mode": "stage", "size": size, "photos": n, "aligned": ok,
            "ms_per_photo": {"decode_full": round(1000 * t_full / n), "decode_reduced": round(1000 * t_dec / n),
                             "align_faces": round(1000 * t_align / n)}, "torch_threads": 1}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def camera_accuracy(photos: list[bytes], metas: list[dict], size: int, out_dir: str) -> dict:
    """The job's path (`fast`) against the same stage fed full-resolution pixels (`full`,
    decode_batch with draft_side=None): refined landmarks and crops of the two, the same quad
    cropped from both kinds of pixels, and each path's quad against the ground truth (the
    astronaut's own refined landmarks carried through the known placement)."""
    from skimage import data

    from pipeline.align_stage import AlignFaces, decode_batch
    from pipeline.decode import decode_image
    from pipeline.schemas import nested_list_to_numpy
    from stmodel.align import crop_from_quad, ffhq_quad

    section = align_section(size, 1)
    n = len(photos)
    raw = {"path": np.array([f"mem/{i}.jpg" for i in range(n)], dtype=object), "bytes": np.array(photos, dtype=object)}
    res = {}
    for name, kw in (("fast", {}), ("full", {"draft_side": None})):
        stage = AlignFaces(section, os.path.join(out_dir, name), "bench")
        t = stage(decode_batch(raw, section, **kw))
        res[name] = {"lm": nested_list_to_numpy(t["landmarks"]), "quad": nested_list_to_numpy(t["quad"]),
                     "uri": t["aligned_uri"].to_pylist(), "status": t["status"].to_pylist()}
    astro = data.astronaut()
    det = stage.detector
    ref = det.refine([astro], [det.detect([astro])[0].landmarks[:1]])[0][0]
    out: dict[str, list[float]] = {k: [] for k in ("lm_px", "lm_pct", "crop_psnr", "same_quad_psnr",
                                                   "fast_vs_truth", "full_vs_truth")}
    for i in range(n):
        f, g = res["fast"], res["full"]
        if f["status"][i] != "ok" or g["status"][i] != "ok":
            continue
        side = float(np.hypot(*(g["quad"][i][3] - g["quad"][i][0])))
        d = float(np.linalg.norm(f["lm"][i] - g["lm"][i], axis=1).mean())
        out["lm_px"].append(d)
        out["lm_pct"].append(100 * d / side)
        a, b = (np.asarray(Image.open(u).convert("RGB")) for u in (f["uri"][i], g["uri"][i]))
        out["crop_psnr"].append(psnr(a, b))
        full = decode_image(photos[i]).image
        out["same_quad_psnr"].append(psnr(a, crop_from_quad(full, f["quad"][i], size)))
        truth, _ = ffhq_quad(placed(ref, metas[i]))
        for name in ("fast", "full"):
            err = np.linalg.norm(res[name]["quad"][i] - truth, axis=1).max() / np.hypot(*(truth[3] - truth[0]))
            out[f"{name}_vs_truth"].append(100 * float(err))

    def stats(v):
        return {"median": round(float(np.median(v)), 2), "min": round(float(np.min(v)), 2),
                "max": round(float(np.max(v)), 2)} if v else None

    return {"mode": "accuracy", "size": size, "photos": n, "compared": len(out["lm_px"]),
            "landmark_px": stats(out["lm_px"]), "landmark_pct_of_quad": stats(out["lm_pct"]),
            "crop_psnr_db": stats(out["crop_psnr"]), "same_quad_psnr_db": stats(out["same_quad_psnr"]),
            "quad_err_pct_vs_truth": {"fast": stats(out["fast_vs_truth"]), "full": stats(out["full_vs_truth"])}}


def camera_main(args) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    size, n = args.size, args.n or 32
    load0 = os.getloadavg()
    t = time.perf_counter()
    photos, metas = camera_photos(n, args.width, args.height, args.cache)
    print(json.dumps({"photos": n, "size": f"{args.width}x{args.height}",
                      "mean_bytes": int(np.mean([len(b) for b in photos])),
                      "made_s": round(time.perf_counter() - t, 1)}), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        # Interleaved: each job run is followed by a share of the plain loop, so that a change
        # of the machine's load in the meantime hits both sides alike.
        jobs, parts = [], []
        base = photos[:args.baseline_n or n]
        for rep in range(args.repeats):
            r = camera_job(photos, size, tmp, f"run{rep}")
            print(json.dumps(r), flush=True)
            jobs.append(r)
            part = plain_loop(base[rep::args.repeats], size, os.path.join(tmp, f"plain{rep}"))
            print(json.dumps({**part, "share": f"{rep}::{args.repeats}"}), flush=True)
            parts.append(part)
        ray.shutdown()
        plain = {"mode": "plain", "size": size, "photos": sum(p["photos"] for p in parts),
                 "aligned": sum(p["aligned"] for p in parts), "seconds": round(sum(p["seconds"] for p in parts), 2),
                 "torch_threads": parts[0]["torch_threads"],
                 "ms_per_photo": {k: round(sum(p["ms_per_photo"][k] * p["photos"] for p in parts)
                                           / max(1, sum(p["photos"] for p in parts)))
                                  for k in parts[0]["ms_per_photo"]}}
        plain["photos_per_s"] = round(plain["photos"] / plain["seconds"], 3)
        results += [plain] + jobs
        if args.stage:
            r = camera_stage(photos, size, os.path.join(tmp, "stage"))
            print(json.dumps(r), flush=True)
            results.append(r)
        if args.accuracy_n:
            r = camera_accuracy(photos[:args.accuracy_n], metas[:args.accuracy_n], size, os.path.join(tmp, "acc"))
            print(json.dumps(r), flush=True)
            results.append(r)
    secs = sorted(j["seconds"] for j in jobs)
    med = float(np.median(secs))
    plain_per_photo = plain["seconds"] / plain["photos"]
    print(f"\n# {n} photos {args.width}x{args.height} JPEG, align.size={size}")
    print(f"plain loop   {1 / plain_per_photo:7.3f} photos/s  ({plain['seconds']:.1f} s for {plain['photos']}, "
          f"aligned {plain['aligned']}, ms/photo {plain['ms_per_photo']}, torch threads {plain['torch_threads']})")
    print(f"align job    {n / med:7.3f} photos/s  (median of {len(secs)} runs: {med:.1f} s; runs {secs}; "
          f"aligned {[j['aligned'] for j in jobs]})")
    print(f"speed-up     {plain_per_photo * n / med:7.2f}x  (job median vs plain loop, same run)")
    for r in results:
        if r["mode"] in ("stage", "accuracy"):
            print(f"{r['mode']:8} {json.dumps({k: v for k, v in r.items() if k not in ('mode',)})}")
    print(f"(cpu count {os.cpu_count()}, load average at start {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}, "
          f"at end {os.getloadavg()[0]:.1f} / {os.getloadavg()[1]:.1f} / {os.getloadavg()[2]:.1f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="number of photos (16; --camera: 32)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the stage (an actor uses num_cpus)")
    p.add_argument("--ray", action="store_true", help="also run the whole job on local Ray")
    p.add_argument("--concurrency", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--camera", action="store_true", help="camera photos: the align job against a plain loop")
    p.add_argument("--size", type=int, default=256, help="--camera: align.size")
    p.add_argument("--width", type=int, default=4000, help="--camera: photo width")
    p.add_argument("--height", type=int, default=3000, help="--camera: photo height")
    p.add_argument("--repeats", type=int, default=3, help="--camera: job runs (the median counts)")
    p.add_argument("--baseline-n", type=int, default=0, help="--camera: photos in the plain loop (0: all)")
    p.add_argument("--accuracy-n", type=int, default=8, help="--camera: photos compared with the full-resolution path")
    p.add_argument("--no-stage", dest="stage", action="store_false", help="--camera: skip the in-process stage timing")
    p.add_argument("--cache", default=None, help="--camera: folder keeping the generated photos between runs")
    args = p.parse_args()
    if args.camera:
        camera_main(args)
        return
    args.n = args.n or 16
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    photos = make_photos(args.n)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            r = bench_stage(photos, size, args.device, args.batch, os.path.join(tmp, f"stage{size}"), args.threads)
            print(json.dumps(r), flush=True)
            results.append(r)
        if args.ray:
            for size in args.sizes:
                r = bench_ray(photos, size, args.device, tmp, args.concurrency)
                print(json.dumps(r), flush=True)
                results.append(r)
    print(f"\n{'mode':6} {'size':>5} {'faces':>6} {'faces/s':>8}  per-face ms / notes")
    for r in results:
        note = json.dumps(r.get("ms_per_face", {"seconds": r.get("seconds"), "actors": r.get("actors")}))
        print(f"{r['mode']:6} {r['size']:>5} {r['faces']:>6} {r['faces_per_s']:>8}  {note}")
    print(f"(cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
