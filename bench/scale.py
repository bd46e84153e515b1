"""Driver memory against dataset size: the driver plans, counts and commits, so its peak RSS
must not grow with the number of faces.

    python -m bench.scale                        # invert + evaluate over 1k and 10k faces (tiny-32)
    python -m bench.scale --sizes 500 5000 --jobs invert
    python -m bench.scale --sizes 10000 100000 --jobs score   # jobs.score over committed tiny-32 codes

For each size a folder of that many distinct crops, named by a committed `faces` table as
jobs.align leaves it, is inverted (random tiny-32 model, no metrics), then evaluated (PSNR / MSE
only). (A plain folder of crops as input is listed by the driver, as Ray's file readers do:
that listing, not the rows, grows with the folder.) The driver's RSS is sampled every 20 ms during each
job, after a warm-up run of each job (imports, Ray Data's first plan, the model); the figure that
matters is the marginal growth of the peak per face between the sizes:
(growth at the larger size - growth at the smaller) / (difference in faces). For `score` the
input is a committed `latents` table of seeded random tiny-32 codes (written by Ray tasks, not
timed) and a classifier committed beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc, no dependency)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Samples this process's resident set size in a thread; `peak` after `stop`."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def write_crops(folder: str, n: int, size: int = 32, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = base.copy()
        img.reshape(-1)[:8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)  # distinct bytes
        Image.fromarray(img).save(os.path.join(folder, f"c{i:07d}.png"), compress_level=0)


def commit_faces_table(folder: str, root: str) -> None:
    """A committed `faces` table naming every crop of `folder`, as jobs.align leaves it: the
    input of a real invert run (no listing of the crops in the driver)."""
    from pipeline import storage
    from pipeline.decode import image_id
    from pipeline.runner import JobRun, TableSpec
    from pipeline.schemas import FACES_SCHEMA, faces_table

    spec = TableSpec("faces", FACES_SCHEMA, ("image_id", "face_index"), ("image_id",))
    run = JobRun(root, "align")
    rows = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            rows.append({"image_id": image_id(f.read()), "source_uri": path, "status": "ok", "n_faces": 1,
                         "face_index": 0, "aligned_uri": storage.join(folder, name)})
    run.commit({spec: run.write_small(spec, faces_table(rows, run.run_id))}, {"in": len(rows)})


def _code_block(batch: dict, run_id: str):
    import numpy as np

    from pipeline.schemas import latents_schema, make_table

    start, stop = int(batch["start"][0]), int(batch["stop"][0])
    w = np.random.default_rng(start).standard_normal((stop - start, 8, 64)).astype(np.float32)
    ids = [f"{i:064x}" for i in range(start, stop)]
    return make_table({"image_id": ids, "face_index": [0] * len(ids), "status": ["ok"] * len(ids),
                       "checkpoint_sha256": ["0" * 64] * len(ids)}, latents_schema(8, 64), run_id,
                      w_plus=w, ok=np.ones(len(ids), bool))


def commit_codes_and_classifier(root: str, n: int, block: int = 10_000) -> None:
    """A committed `latents` table of `n` seeded random tiny-32 codes (written by Ray tasks) and a
    seeded classifier committed as jobs.fit_classifier commits one."""
    import ray
    import torch

    from pipeline import storage
    from pipeline.model_registry import MODELS, model_key, model_rows
    from pipeline.runner import JobRun, TableSpec
    from pipeline.schemas import latents_schema
    from stmodel.checkpoint import save_obj
    from stmodel.classifier import LatentClassifier, classifier_state

    spec = TableSpec("latents", latents_schema(8, 64), ("image_id", "face_index"))
    run = JobRun(root, "invert", rows_per_file=block)
    items = ray.data.from_items([{"start": s, "stop": min(n, s + block)} for s in range(0, n, block)])
    res = run.write(items.map_batches(_code_block, batch_size=1, fn_kwargs={"run_id": run.run_id}), spec)
    run.commit({spec: res}, {"in": n})
    fit = JobRun(root, "fit_classifier")
    torch.manual_seed(0)
    uri = storage.join(root, model_key("classifier", fit.run_id, "classifier.pt"))
    sha = save_obj(classifier_state(LatentClassifier(8, 64, 3, (128, 64), 16, ["Smiling", "Eyeglasses", "Male"])), uri)
    fit.commit({MODELS: fit.write_small(MODELS, model_rows([{"uri": uri, "kind": "classifier", "sha256": sha}],
                                                           fit.run_id))}, {"in": 0})


def measure(job: str, cfg: Any) -> dict:
    """`cfg`: the settings object of `job`."""
    from jobs import evaluate, invert, score

    runs: dict[str, Callable[[Any], dict]] = {"invert": invert.run, "evaluate": evaluate.run, "score": score.run}
    with PeakRSS() as m:
        t0 = time.time()
        res = runs[job](cfg)
        seconds = time.time() - t0
    return {"job": job, "counts": res["counts"], "seconds": round(seconds, 1),
            "rss_before_mb": round(m.start / 2**20, 1),
            "peak_mb": round(m.peak / 2**20, 1), "growth_mb": round((m.peak - m.start) / 2**20, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--jobs", nargs="+", default=["invert", "evaluate"], choices=["invert", "evaluate", "score"])
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)

    import logging

    import ray

    from jobs import evaluate, invert
    from jobs.cli import load_config

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=args.num_cpus, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    work = args.workdir or tempfile.mkdtemp(prefix="stbatch-scale-")
    rows = []
    model = ["model.preset=tiny-32", "model.seed=0", "progress=false"]
    for i, n in enumerate([100, *sorted(args.sizes)]):
        warmup = i == 0
        crops, out = os.path.join(work, f"crops_{i}_{n}"), os.path.join(work, f"ds_{i}_{n}")
        if args.jobs == ["score"]:  # codes, no crops: the scale a classifier pass meets
            from jobs import score

            commit_codes_and_classifier(out, n)
            r = {"faces": n, **measure("score", load_config(score.SETTINGS, None, [f"latents={out}", "progress=false",
                                                                                    "score.batch_size=4096"]))}
            if not warmup:
                rows.append(r)
                print(json.dumps(r), flush=True)
            continue
        write_crops(crops, n, seed=i)
        commit_faces_table(crops, out)
        cfgs: dict[str, Any] = {
            "invert": load_config(invert.SETTINGS, None, [f"input={out}", f"output={out}", *model,
                                                          "invert.batch_size=64", "invert.load_batch_size=256"]),
            "evaluate": load_config(evaluate.SETTINGS, None, [
                f"input={out}", *model, "metric_weights.skip_missing=true", "evaluate.batch_size=64",
                "evaluate.load_batch_size=256"])}
        for job in ("invert", "evaluate"):
            if job not in args.jobs:
                if job == "invert":
                    invert.run(cfgs[job])  # evaluate needs the latents
                continue
            r = {"faces": n, **measure(job, cfgs[job])}
            if not warmup:
                rows.append(r)
                print(json.dumps(r), flush=True)
    lo, hi = min(args.sizes), max(args.sizes)
    for job in args.jobs:
        a = [r for r in rows if r["job"] == job and r["faces"] == lo][0]
        b = [r for r in rows if r["job"] == job and r["faces"] == hi][0]
        per_face = (b["growth_mb"] - a["growth_mb"]) * 2**20 / max(hi - lo, 1)
        print(f"{job}: driver peak growth {a['growth_mb']} MB at {lo} faces, {b['growth_mb']} MB at {hi} faces: "
              f"{per_face:.0f} bytes per face (bound 512); "
              f"{b['counts']['in'] / max(b['seconds'], 1e-9):.0f} faces/s at {hi}",
              flush=True)
    ray.shutdown()
    return rows


if __name__ == "__main__":
    main()
