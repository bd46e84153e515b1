"""Evaluate job: reconstruction metrics for an existing `latents` table.

    python -m jobs.evaluate --set input=URI --set model.checkpoint=URI [--set output=URI]

Reads the committed `latents` rows with status ok under `input`, regenerates each face from
its W+ code with the same checkpoint (its sha256 must match the table's), compares it with the
aligned crop, writes the reconstruction to `<output>/reconstructions/`, the per-face rows to
the `metrics` table and mean / p50 / p95 of PSNR, MSE, LPIPS and ID similarity to the summary
and the run manifest. Faces already in a committed `metrics` run are skipped.

Counts (one per face): in = ok + failed + skipped.
"""
from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute as pc

from jobs.cli import main
from jobs.invert import metric_summary, model_shapes
from pipeline import storage
from pipeline.compute import actor_pool, device_for, gpus_per_actor
from pipeline.evaluate_stage import EvaluateBatch, load_targets

log = logging.getLogger("stbatch.evaluate")

JOB = "evaluate"
TABLE = "metrics"

DEFAULTS = {
    "input": None,    # dataset root holding a committed `latents` table
    "output": None,   # where metrics/ and reconstructions/ go (default: input)
    "progress": True,
    "model": {"checkpoint": None, "sha256": None, "preset": None, "seed": 0, "name": None},
    "metric_weights": {"lpips_alexnet": None, "facenet": None, "allow_random_init": False,
                       "skip_missing": False},
    "evaluate": {
        "batch_size": 8, "concurrency": 1, "num_gpus": "auto", "num_cpus": 1, "device": "auto",
        "amp": "auto", "load_batch_size": 16, "max_pixels": 64_000_000, "log_every_s": 30,
    },
}


def run(cfg: dict) -> dict:
    import ray

    if not cfg.get("input"):
        raise SystemExit("evaluate: set input=URI (a dataset root with a latents table)")
    output = cfg.get("output") or cfg["input"]
    c = cfg["evaluate"]
    t0 = time.time()
    r = storage.Run(output, JOB, cfg)
    r.sweep_uncommitted([TABLE])
    lat = storage.read_committed(cfg["input"], "latents")
    if lat is None:
        raise SystemExit(f"evaluate: no committed latents table under {cfg['input']}")
    lat = lat.filter(pc.equal(lat["status"], "ok"))
    done = storage.read_committed(output, TABLE, columns=["image_id", "face_index"])
    done_keys = set(zip(done["image_id"].to_pylist(), done["face_index"].to_pylist())) if done is not None else set()
    keys = list(zip(lat["image_id"].to_pylist(), lat["face_index"].to_pylist()))
    todo_mask = pa.array([k not in done_keys for k in keys])
    todo = lat.filter(todo_mask)
    counts = {"in": lat.num_rows, "ok": 0, "failed": 0, "skipped": lat.num_rows - todo.num_rows}
    shapes = model_shapes(cfg["model"])
    log.info("evaluate %s: %d faces, %d skipped, run %s", cfg["input"], lat.num_rows, counts["skipped"], r.run_id)
    parts, part = [], 0
    if todo.num_rows:
        num_gpus = gpus_per_actor(c["num_gpus"])
        ds = ray.data.from_arrow(todo)
        ds = ds.map_batches(load_targets, batch_size=int(c["load_batch_size"]), batch_format="pyarrow",
                            fn_kwargs={"target_size": shapes["pool_size"], "max_pixels": int(c["max_pixels"])})
        kw = {"num_gpus": num_gpus} if num_gpus > 0 else {}
        ds = ds.map_batches(EvaluateBatch, batch_size=int(c["batch_size"]), batch_format="numpy",
                            compute=actor_pool(c["concurrency"]), num_cpus=float(c["num_cpus"]), **kw,
                            fn_constructor_kwargs={
                                "model": cfg["model"], "run_id": r.run_id, "output": output,
                                "metrics": cfg["metric_weights"], "device": device_for(c["device"], num_gpus),
                                "amp": c["amp"], "torch_threads": max(1, int(float(c["num_cpus"])))})
        last = time.time()
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if not batch.num_rows:
                continue
            st = batch["status"].to_pylist()
            counts["ok"] += st.count("ok")
            counts["failed"] += len(st) - st.count("ok")
            parts.append(batch)
            if time.time() - last >= float(c["log_every_s"]):
                last = time.time()
                log.info("evaluate progress: %d/%d faces", counts["ok"] + counts["failed"], todo.num_rows)
        if parts:
            r.write_table(TABLE, pa.concat_tables(parts), part=part)
    seconds = time.time() - t0
    extra = {"metrics": metric_summary(parts), "model": shapes["name"]}
    r.commit({**counts, "seconds": round(seconds, 2), **extra},
             extra={"inputs": {"input": cfg["input"]}, "checkpoint_sha256": shapes["sha256"],
                    "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


if __name__ == "__main__":
    main(JOB, __doc__, DEFAULTS, run)
