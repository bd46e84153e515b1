"""Benchmark (not a test): images/s of the Ray inversion pipeline (jobs.invert: read + hash +
decode + resize on CPU tasks, encoder on an actor) against a bare loop of the same model over the
same batches, at ffhq-1024 shapes (random weights). Pipeline efficiency = bare loop / pipeline time.

    python -m bench.invert_pipeline [--n 96] [--batch 8] [--threads 2] [--device cpu|cuda] [--amp auto]
                                    [--repeats 3]

Like for like: both sides run the encoder alone (the job builds no generator without metrics),
with the same torch threads, device and autocast dtype (`--amp`: auto = bf16 on CUDA, fp32 on
a CPU, as the job's default; none / bf16 / fp16), on the same number of crops (256x256 PNG).

Each repeat starts a fresh local Ray (start-up not timed), then runs the job twice, each on its
own folder of new crops and its own output (nothing skipped): `cold` is the first run on the
new cluster (worker processes start, import torch, build the model), `warm` the second.
Timed: the whole `jobs.invert.run` call (listing, plan, every stage, the Delta commit and the
run record). The bare loop (decode + preprocess + encoder in one process, model built and warmed
up beforehand) is timed once per repeat, just before that repeat's runs. Medians are what the
last lines report.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch


def make_crops(folder: str, n: int, seed: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    files = []
    for i in range(n):
        img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        f = os.path.join(folder, f"{i:04d}.png")
        Image.fromarray(img).resize((256, 256), Image.BILINEAR).save(f)
        files.append(f)
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=96, help="aligned crops (256x256 PNG) per run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the model (both sides)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", help="auto | none | bf16 | fp16 (both sides)")
    p.add_argument("--preset", default="ffhq-1024")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    from PIL import Image

    from jobs import invert
    from jobs.cli import load_config
    from pipeline import storage
    from pipeline.images import to_model_input
    from pipeline.models import amp_dtype, load_model

    load0 = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="bench_invert_")
    files = make_crops(os.path.join(tmp, "bare"), args.n, 0)
    spec = {"preset": args.preset, "seed": 0}
    device = torch.device(args.device)
    amp = amp_dtype(args.amp, device)

    # bare loop: decode + preprocess + encoder, one process, the same batches, threads and dtype
    torch.set_num_threads(args.threads)
    model, _ = load_model(spec, generator=False)
    model.to(device).requires_grad_(False)
    if amp is not None:
        model.cast_encoder_weights(amp)
    size = model.cfg.input_size

    def bare() -> float:
        t = time.perf_counter()
        for s in range(0, len(files), args.batch):
            x = np.stack([to_model_input(np.asarray(Image.open(f).convert("RGB")), size) for f in files[s:s + args.batch]])
            with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                model.invert(torch.from_numpy(x).to(device)).float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    bare()  # warm-up
    t_bare = []
    runs = {"cold": [], "warm": []}
    secs = {"cold": [], "warm": []}
    for rep in range(args.repeats):  # interleaved, so that a change of load hits both sides
        t_bare.append(bare())
        print(json.dumps({"mode": "bare", "repeat": rep, "seconds": round(t_bare[-1], 2)}), flush=True)
        ray.init(num_cpus=os.cpu_count(), num_gpus=1 if device.type == "cuda" else 0, log_to_driver=False)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        for kind in ("cold", "warm"):
            crops = os.path.join(tmp, f"crops_{rep}_{kind}")
            make_crops(crops, args.n, 1000 * (rep + 1) + (kind == "warm"))
            out = os.path.join(tmp, f"out_{rep}_{kind}")
            sets = [f"input={crops}", f"output={out}", f"model.preset={args.preset}", "model.seed=0",
                    f"invert.batch_size={args.batch}", f"invert.torch_threads={args.threads}",
                    f"invert.device={args.device}", f"invert.amp={args.amp}",
                    "invert.num_gpus=" + ("1" if device.type == "cuda" else "0"), "progress=false"]
            t = time.perf_counter()
            res = invert.run(load_config(invert.SETTINGS, None, sets))
            wall = time.perf_counter() - t
            with open(storage.join(out, storage.RUNS_DIR, f"{res['run_id']}.json")) as f:
                job_s = float(json.load(f)["summary"]["seconds"])
            assert res["counts"]["ok"] == args.n, res["counts"]
            runs[kind].append(wall)
            secs[kind].append(job_s)
            print(json.dumps({"mode": kind, "repeat": rep, "seconds": round(wall, 2), "job_seconds": job_s,
                              "counts": res["counts"]}), flush=True)
        ray.shutdown()

    n = args.n
    tb = float(np.median(t_bare))
    amp_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    print(f"\n# {args.preset} encoder, {n} crops, batch {args.batch}, {args.threads} threads, {args.device}, "
          f"{amp_name} on both sides, medians of {args.repeats}")
    print(f"bare loop          {n / tb:7.3f} img/s  ({tb:.1f} s; runs {[round(v, 1) for v in t_bare]})")
    for kind, label in (("cold", "pipeline, cold    "), ("warm", "pipeline, warm    ")):
        tp = float(np.median(runs[kind]))
        print(f"{label} {n / tp:7.3f} img/s  ({tp:.1f} s; runs {[round(v, 1) for v in runs[kind]]}; job's own "
              f"seconds {[round(v, 1) for v in secs[kind]]})  efficiency {100 * tb / tp:5.1f}%")
    print(f"(cpu count {os.cpu_count()}, load average at start {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}, "
          f"at end {os.getloadavg()[0]:.1f} / {os.getloadavg()[1]:.1f} / {os.getloadavg()[2]:.1f})")


if __name__ == "__main__":
    main()
