"""Benchmark of the model library (not a test): images/s, achieved GFLOP/s and peak memory of
`invert` (encoder only) and `invert + reconstruct`, each as a share of this machine's matmul
peak measured in the same run.

    python -m bench.model_speed                       # ffhq-1024, CPU, batches 1 4 8, fp32
    python -m bench.model_speed --amp bf16            # autocast bf16 (+ max |W+ diff| vs fp32)
    python -m bench.model_speed --device cuda --amp fp16 --batches 1 8 32

Random weights (speed does not depend on them). Each (mode, batch) runs in its own process so
its peak memory (RSS on CPU, allocator peak on CUDA) is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from stmodel.config import get_preset
from stmodel.inversion import StyleTransformer

DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 8) -> float:
    """Achieved GFLOP/s of a square matmul: the machine's practical peak for that dtype."""
    if device == "cuda":
        n = 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * reps / best / 1e9


def count_flops(model: StyleTransformer, x: torch.Tensor, mode: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        w = model.invert(x)
        if mode == "full":
            model.reconstruct(w, resize=False)
    return fc.get_total_flops()


def build(preset: str, device: str, channels_last: bool) -> StyleTransformer:
    torch.manual_seed(0)
    m = StyleTransformer(get_preset(preset)).eval().requires_grad_(False).to(device)
    if channels_last:
        m.encoder.to(memory_format=torch.channels_last)
    return m


def run_one(args) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    m = build(args.preset, args.device, args.channels_last)
    cfg = m.cfg
    x = torch.rand(args.batch, 3, cfg.input_size, cfg.input_size, device=args.device) * 2 - 1
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = DTYPES[args.amp]
    ref = None
    if amp is not None:
        with torch.no_grad():
            ref = m.invert(x)  # the fp32 codes, before the weights are cast
        m.cast_encoder_weights(amp)

    def step():
        with torch.no_grad(), torch.autocast(args.device, dtype=amp, enabled=amp is not None):
            w = m.invert(x)
            if args.mode == "full":
                m.reconstruct(w, resize=False)
        return w

    w = step()  # warm-up (allocations, oneDNN primitive creation, cuDNN autotune)
    sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - t)
    best = min(times)
    flops = count_flops(m, x[:1], args.mode) * args.batch
    out = {"mode": args.mode, "batch": args.batch, "amp": args.amp, "device": args.device,
           "seconds_per_batch": best, "images_per_s": args.batch / best, "gflops_per_s": flops / best / 1e9,
           "gflop_per_image": flops / args.batch / 1e9}
    if args.device == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if ref is not None and args.mode == "invert":
        out["max_abs_wplus_diff_vs_fp32"] = (w.float() - ref).abs().max().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ffhq-1024")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--modes", nargs="+", default=["invert", "full"], choices=["invert", "full"])
    p.add_argument("--amp", default="none", choices=sorted(DTYPES))
    p.add_argument("--channels-last", action="store_true",
                   help="encoder in NHWC too (the generator always runs NHWC)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    peak32 = matmul_peak(args.device, torch.float32)
    peak16 = matmul_peak(args.device, torch.bfloat16)
    peak = peak32 if args.amp == "none" else (peak16 if args.amp == "bf16" else matmul_peak(args.device, torch.float16))
    print(f"# {args.preset} on {args.device} ({torch.get_num_threads()} threads), amp={args.amp}")
    print(f"# matmul peak: fp32 {peak32:.1f} GFLOP/s, bf16 {peak16:.1f} GFLOP/s")
    print(f"{'mode':8s} {'batch':>5s} {'img/s':>8s} {'s/img':>7s} {'GFLOP/s':>8s} {'%peak':>6s} {'%fp32pk':>7s} "
          f"{'mem GB':>7s}")
    rows = []
    for mode in args.modes:
        for b in args.batches:
            cmd = [sys.executable, "-m", "bench.model_speed", "--one", "--mode", mode, "--batch", str(b),
                   "--preset", args.preset, "--device", args.device, "--amp", args.amp,
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            if args.channels_last:
                cmd.append("--channels-last")
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                          env=dict(os.environ)).stdout.strip().splitlines()[-1])
            r["share_of_peak"] = r["gflops_per_s"] / peak
            r["share_of_fp32_peak"] = r["gflops_per_s"] / peak32
            rows.append(r)
            extra = f"  max|dW+|={r['max_abs_wplus_diff_vs_fp32']:.4f}" if "max_abs_wplus_diff_vs_fp32" in r else ""
            print(f"{mode:8s} {b:5d} {r['images_per_s']:8.3f} {1 / r['images_per_s']:7.3f} {r['gflops_per_s']:8.1f} "
                  f"{100 * r['share_of_peak']:5.1f}% {100 * r['share_of_fp32_peak']:6.1f}% "
                  f"{r['peak_mem_gb']:7.2f}{extra}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_fp32": peak32, "peak_bf16": peak16, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
