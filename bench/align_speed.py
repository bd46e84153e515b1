"""Benchmark of the align stage (not a test): faces per second on this machine.

    python -m bench.align_speed                      # 16 photos, sizes 256 and 1024, CPU
    python -m bench.align_speed --n 32 --sizes 1024 --ray   # also the whole job on local Ray
    python -m bench.align_speed --device cuda

Photos are skimage's astronaut rotated / scaled / placed on 1024x768 and 512x512 canvases (one
face each). `stage` runs `AlignFaces` in this process on decoded batches and splits the time
into detect, refine, crop (FFHQ transform) and PNG encode+write; `decode` times the decode
stage on the encoded JPEGs; `ray` (optional) runs `jobs.align` end to end on local Ray (job
seconds, Ray start-up excluded). One JSON line per measurement, then a table.
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


def bench_stage(photos: list[bytes], size: int, device: str, batch: int, out_dir: str, threads: int) -> dict:
    import torch

    from pipeline import storage
    from pipeline.align_stage import AlignFaces, aligned_key, decode_batch, select_faces
    from pipeline.images import encode_png
    from stmodel.align import align_face

    paths = np.array([f"mem/{i}.jpg" for i in range(len(photos))], dtype=object)
    t = time.perf_counter()
    dec = decode_batch({"path": paths, "bytes": np.array(photos, dtype=object)})
    t_decode = time.perf_counter() - t

    stage = AlignFaces(out_dir, "bench", size=size, device=device, torch_threads=threads)
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
        keep = [select_faces(f, "largest", 0.9, 32)[3] for f in found]
        t = time.perf_counter()
        lms = det.refine(chunk, [f.landmarks[k] for f, k in zip(found, keep)])
        parts["refine"] += time.perf_counter() - t
        for j, (img, lm) in enumerate(zip(chunk, lms)):
            for k in range(len(lm)):
                t = time.perf_counter()
                crop, _ = align_face(img, lm[k], size=size)
                parts["crop"] += time.perf_counter() - t
                t = time.perf_counter()
                iid = str(dec["image_id"][s + j])
                storage.write_bytes(storage.join(out_dir, aligned_key(iid, k)), encode_png(crop))
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
    cfg = load_config(align.DEFAULTS, None, [f"input={inp}", f"output={out}", f"align.size={size}",
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="number of photos")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the stage (an actor uses num_cpus)")
    p.add_argument("--ray", action="store_true", help="also run the whole job on local Ray")
    p.add_argument("--concurrency", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = p.parse_args()
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
