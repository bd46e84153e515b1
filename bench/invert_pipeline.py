"""Benchmark (not a test): images/s of the Ray inversion pipeline (jobs.invert: read + hash +
decode + resize on CPU tasks, encoder on actors) against bare loops of the same model over the
same batches, at ffhq-1024 shapes (random weights). Pipeline efficiency = bare loop / pipeline time.

    python -m bench.invert_pipeline [--n 96] [--batch 8] [--actors 1] [--threads N] [--device cpu|cuda]
                                    [--amp auto] [--dashboard auto] [--repeats 3]

Like for like: the job runs `--actors` inversion actors of `--threads` torch threads each; the
bare loop runs as many processes of as many threads, each over its share of the batches, at
once (decode + preprocess + encoder, model built and warmed up beforehand). With more than one
actor, a second reference is one process with all the threads (actors x threads), the usual
single-loop figure. Both sides use the same device and autocast dtype (`--amp`: auto = bf16 on
CUDA, fp32 on a CPU, as the job's default; none / bf16 / fp16) on the same number of crops
(256x256 PNG). On a CPU the actors' Ray accounting (`invert.num_cpus`) leaves one CPU to the
read tasks; the threads are what `--threads` says.

Each repeat starts a fresh local Ray the way the jobs do (`jobs.cli.init_ray`, so the dashboard
follows `ray.dashboard`: `--dashboard auto` is the job's default; start-up not timed), then
runs the job twice, each on its own folder of new crops and its own output (nothing skipped):
`cold` is the first run on the new cluster (worker processes start, import torch, build the
model, and Ray Data starts its own actors), `warm` the second. Timed: the whole
`jobs.invert.run` call (listing, plan, every stage, the Delta commit and the run record). The
bare loops are timed once per repeat, just before that repeat's runs. Medians are what the last
lines report.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time

import numpy as np
import torch

from pipeline.sections import ModelSection


def make_crops(folder: str, n: int, seed: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    files = []
    for i in range(n):
        img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        f = os.path.join(folder, f"{i:04d}.png")
        Image.fromarray(img).resize((256, 256), Image.Resampling.BILINEAR).save(f)
        files.append(f)
    return files


def _bare_process(batches: list[list[str]], spec: ModelSection, threads: int, device: str, amp: str, conn) -> None:
    """One process of a bare loop: build and warm up the model, then run its batches each time
    the parent asks, answering with (start, end) wall-clock times."""
    from PIL import Image

    from pipeline.images import to_model_input
    from pipeline.models import amp_dtype, load_model

    torch.set_num_threads(threads)
    dev = torch.device(device)
    dtype = amp_dtype(amp, dev)
    model, _ = load_model(spec, generator=False)
    model.to(dev).requires_grad_(False)
    if dtype is not None:
        model.cast_encoder_weights(dtype)
    size = model.cfg.input_size

    def run() -> tuple[float, float]:
        t = time.time()
        for files in batches:
            x = np.stack([to_model_input(np.asarray(Image.open(f).convert("RGB")), size) for f in files])
            with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                model.invert(torch.from_numpy(x).to(dev)).float().cpu()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return t, time.time()

    run()  # warm-up
    conn.send("ready")
    while conn.recv():
        conn.send(run())


class BareLoop:
    """`processes` processes of `threads` torch threads each, the batches dealt round-robin."""

    def __init__(self, files: list[str], batch: int, processes: int, threads: int, spec: ModelSection, device: str,
                 amp: str):
        batches = [files[s:s + batch] for s in range(0, len(files), batch)]
        ctx = mp.get_context("spawn")
        self.label = f"{processes} x {threads} thread{'s' if threads > 1 else ''}"
        self.conns, self.procs = [], []
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        for i in range(processes):
            mine, theirs = ctx.Pipe()
            dev = f"cuda:{i % gpus}" if gpus > 1 else device  # as the job's actors: a GPU each
            p = ctx.Process(target=_bare_process, args=(batches[i::processes], spec, threads, dev, amp, theirs),
                            daemon=True)
            p.start()
            self.conns.append(mine)
            self.procs.append(p)
        for c in self.conns:
            assert c.recv() == "ready"

    def time(self) -> float:
        for c in self.conns:
            c.send(True)
        spans = [c.recv() for c in self.conns]
        return max(e for _, e in spans) - min(s for s, _ in spans)

    def close(self) -> None:
        for c in self.conns:
            c.send(False)
        for p in self.procs:
            p.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=96, help="aligned crops (256x256 PNG) per run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--actors", type=int, default=1, help="inversion actors (bare: processes)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per actor and bare process "
                                                          "(0: the cores shared out among the actors)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", help="auto | none | bf16 | fp16 (both sides)")
    p.add_argument("--dashboard", default="auto", help="ray.dashboard of the local Ray: auto (the job's "
                                                       "default) | true | false")
    p.add_argument("--preset", default="ffhq-1024")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray

    from jobs import invert
    from jobs.cli import init_ray, load_config
    from pipeline import storage
    from pipeline.models import amp_dtype

    load0 = os.getloadavg()
    cores = os.cpu_count() or 1
    actors = max(1, args.actors)
    threads = args.threads or max(1, cores // actors)
    tmp = tempfile.mkdtemp(prefix="bench_invert_")
    files = make_crops(os.path.join(tmp, "bare"), args.n, 0)
    spec = ModelSection(preset=args.preset)
    device = torch.device(args.device)
    amp = amp_dtype(args.amp, device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    bare = [BareLoop(files, args.batch, actors, threads, spec, args.device, args.amp)]
    if actors > 1:  # the usual single-loop reference: one process with all the threads
        bare.append(BareLoop(files, args.batch, 1, actors * threads, spec, args.device, args.amp))
    # Ray's accounting: leave one CPU to the read tasks (they would wait for the actors' CPUs)
    num_cpus = min(float(threads), max(0.1, (cores - 1) / actors)) if device.type == "cpu" else 1.0

    t_bare: dict[str, list[float]] = {b.label: [] for b in bare}
    runs: dict[str, list] = {"cold": [], "warm": []}
    secs: dict[str, list[float]] = {"cold": [], "warm": []}
    for rep in range(args.repeats):  # interleaved, so that a change of load hits both sides
        for b in bare:
            t_bare[b.label].append(b.time())
            print(json.dumps({"mode": f"bare {b.label}", "repeat": rep, "seconds": round(t_bare[b.label][-1], 2)}),
                  flush=True)
        init_ray(load_config(invert.SETTINGS, None, [f"ray.num_cpus={cores}", f"ray.num_gpus={gpus}",
                                                     f"ray.dashboard={args.dashboard}", "progress=false"]))
        for kind in ("cold", "warm"):
            crops = os.path.join(tmp, f"crops_{rep}_{kind}")
            make_crops(crops, args.n, 1000 * (rep + 1) + (kind == "warm"))
            out = os.path.join(tmp, f"out_{rep}_{kind}")
            sets = [f"input={crops}", f"output={out}", f"model.preset={args.preset}", "model.seed=0",
                    f"invert.batch_size={args.batch}", f"invert.concurrency={actors}",
                    f"invert.torch_threads={threads}", f"invert.num_cpus={num_cpus}",
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
    for b in bare:
        b.close()

    n = args.n
    amp_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    print(f"\n# {args.preset} encoder, {n} crops, batch {args.batch}, {args.device}, {amp_name} on both sides, "
          f"job: {actors} actor(s) x {threads} thread(s) (num_cpus {num_cpus:g}), dashboard {args.dashboard}, "
          f"medians of {args.repeats}")
    medians = {label: float(np.median(v)) for label, v in t_bare.items()}
    for label, tb in medians.items():
        print(f"bare loop {label:14s} {n / tb:7.3f} img/s  ({tb:.1f} s; runs {[round(v, 1) for v in t_bare[label]]})")
    for kind, label in (("cold", "pipeline, cold          "), ("warm", "pipeline, warm          ")):
        tp = float(np.median(runs[kind]))
        eff = ", ".join(f"{100 * tb / tp:5.1f}% of {lb}" for lb, tb in medians.items())
        print(f"{label} {n / tp:7.3f} img/s  ({tp:.1f} s; runs {[round(v, 1) for v in runs[kind]]}; job's own "
              f"seconds {[round(v, 1) for v in secs[kind]]})  efficiency {eff}")
    print(f"(cpu count {cores}, load average at start {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}, "
          f"at end {os.getloadavg()[0]:.1f} / {os.getloadavg()[1]:.1f} / {os.getloadavg()[2]:.1f})")


if __name__ == "__main__":
    main()
