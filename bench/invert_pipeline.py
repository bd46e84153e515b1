"""Benchmark (not a test): images/s of the Ray inversion pipeline (jobs.invert: read + decode +
resize on CPU tasks, encoder on an actor) against a bare loop of the same model over the same
batches, at ffhq-1024 shapes (random weights). Pipeline efficiency = pipeline / bare loop.

    python -m bench.invert_pipeline [--n 48] [--batch 8] [--threads 2] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=48, help="aligned crops (256x256 PNG)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the model (both runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="ffhq-1024")
    args = p.parse_args()

    import ray
    from PIL import Image

    from jobs import invert
    from jobs.cli import load_config
    from pipeline.images import to_model_input
    from pipeline.models import load_model

    tmp = tempfile.mkdtemp(prefix="bench_invert_")
    rng = np.random.default_rng(0)
    crops = os.path.join(tmp, "crops")
    os.makedirs(crops)
    files = []
    for i in range(args.n):
        img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        f = os.path.join(crops, f"{i:04d}.png")
        Image.fromarray(img).resize((256, 256), Image.BILINEAR).save(f)
        files.append(f)
    spec = {"preset": args.preset, "seed": 0}

    # bare loop: decode + preprocess + encoder, one process, same batches
    torch.set_num_threads(args.threads)
    model, _ = load_model(spec)
    model.to(args.device).requires_grad_(False)
    size = model.cfg.input_size

    def bare():
        t = time.perf_counter()
        for s in range(0, len(files), args.batch):
            x = np.stack([to_model_input(np.asarray(Image.open(f).convert("RGB")), size) for f in files[s:s + args.batch]])
            with torch.no_grad():
                model.invert(torch.from_numpy(x).to(args.device)).cpu()
        return time.perf_counter() - t

    bare()  # warm-up
    t_bare = bare()

    ray.init(num_cpus=os.cpu_count(), num_gpus=1 if args.device == "cuda" else 0, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    sets = [f"input={crops}", f"output={tmp}/out", f"model.preset={args.preset}", "model.seed=0",
            f"invert.batch_size={args.batch}", f"invert.torch_threads={args.threads}",
            f"invert.device={args.device}", "invert.num_gpus=" + ("1" if args.device == "cuda" else "0"),
            "progress=false"]
    t = time.perf_counter()
    res = invert.run(load_config(invert.DEFAULTS, None, sets))
    t_pipe = time.perf_counter() - t
    # steady state: a second run over new crops, with Ray and the cluster already up
    for i, f in enumerate(files):
        img = np.asarray(Image.open(f)).copy()
        img[0, 0] = (img[0, 0].astype(int) + 1) % 256
        Image.fromarray(img).save(os.path.join(crops, f"b{i:04d}.png"))
    t = time.perf_counter()
    res2 = invert.run(load_config(invert.DEFAULTS, None, sets))
    t_pipe2 = time.perf_counter() - t
    n = len(files)
    print(f"# {args.preset} encoder, {n} crops, batch {args.batch}, {args.threads} threads, {args.device}")
    print(f"bare loop          {n / t_bare:7.3f} img/s  ({t_bare:.1f} s)")
    print(f"pipeline, cold     {n / t_pipe:7.3f} img/s  ({t_pipe:.1f} s, includes hashing pass and actor start)  "
          f"efficiency {100 * t_bare / t_pipe:5.1f}%")
    print(f"pipeline, 2nd run  {n / t_pipe2:7.3f} img/s  ({t_pipe2:.1f} s)  efficiency {100 * t_bare / t_pipe2:5.1f}%")
    print(f"counts: {res['counts']} / {res2['counts']}")


if __name__ == "__main__":
    main()
