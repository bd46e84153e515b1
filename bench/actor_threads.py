"""Benchmark (not a test): the encoder's speed when the model is set up and run on one thread
(what pipeline.models.ModelActor does) against set up on one thread and run on another (what a
Ray Data actor does by default: `__init__` on the actor's thread, `__call__` on a UDF thread).

    python -m bench.actor_threads [--repeats 5] [--iters 3] [--batch 8] [--threads 2] [--preset ffhq-1024]

Each measurement is a fresh process (OpenMP's thread teams live as long as the process), the
two ways interleaved so that a change of machine load hits both; the last lines report the
median seconds per batch, the median CPU use of the process, and the ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def measure(mode: str, preset: str, batch: int, threads: int, iters: int) -> dict:
    """One process's figures: `mode` = one-thread | two-threads."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from pipeline.models import load_model
    from pipeline.sections import ModelSection

    torch.set_num_threads(threads)
    runner = ThreadPoolExecutor(max_workers=1)

    def build():
        m, _ = load_model(ModelSection(preset=preset), generator=False)
        return m.requires_grad_(False)

    model = runner.submit(build).result() if mode == "one-thread" else build()
    x = torch.randn(batch, 3, model.cfg.input_size, model.cfg.input_size)

    @torch.no_grad()
    def run() -> tuple[list, list]:
        model.invert(x)  # warm-up
        secs, cpu = [], []
        for _ in range(iters):
            t, c = time.perf_counter(), time.process_time()
            model.invert(x)
            secs.append(time.perf_counter() - t)
            cpu.append((time.process_time() - c) / secs[-1])
        return secs, cpu

    secs, cpu = runner.submit(run).result()
    return {"mode": mode, "seconds": secs, "cpu": cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="processes per way")
    p.add_argument("--iters", type=int, default=3, help="timed batches per process")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--preset", default="ffhq-1024")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.preset, args.batch, args.threads, args.iters)))
        return
    res: dict[str, list] = {"one-thread": [], "two-threads": []}
    for rep in range(args.repeats):
        for mode in res:
            out = subprocess.run([sys.executable, "-m", "bench.actor_threads", "--child", mode,
                                  "--iters", str(args.iters),
                                  "--batch", str(args.batch), "--threads", str(args.threads), "--preset", args.preset],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            res[mode].append(r)
            print(json.dumps({"repeat": rep, "mode": mode, "seconds": [round(s, 3) for s in r["seconds"]],
                              "cpu": [round(c, 2) for c in r["cpu"]]}), flush=True)
    med = {m: statistics.median(s for r in rs for s in r["seconds"]) for m, rs in res.items()}
    cpu = {m: statistics.median(c for r in rs for c in r["cpu"]) for m, rs in res.items()}
    print(f"\n# {args.preset} encoder, batch {args.batch}, {args.threads} torch threads, "
          f"{args.repeats} processes x {args.iters} batches per way (medians)")
    for m in res:
        print(f"{m:12s} {med[m]:7.3f} s/batch  cpu {100 * cpu[m]:4.0f} %")
    print(f"two-threads / one-thread: {med['two-threads'] / med['one-thread']:.3f}x the time")


if __name__ == "__main__":
    main()
