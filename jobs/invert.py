"""Invert job: aligned face crops -> the `latents` table (one W+ code per face).

    python -m jobs.invert --set input=URI --set output=URI --set model.checkpoint=URI [--set metrics=true]

`input` is either the output of `jobs.align` (its committed `faces` Delta table is read: every
face with status ok) or a plain folder of aligned crops (each file one face, read once; image_id
= sha256 of its bytes). Faces whose (image_id, face_index) has a committed `latents` row that is
ok or a permanent failure are skipped; transient failures (read errors, lost rows, inversion
errors) are tried again, and `retry_failed=true` retries every failure. A retried face's new
row replaces the old one in the same commit, so a nightly rerun over a growing prefix inverts
only what is new, and a killed run (nothing committed) is simply done again.

The encoder runs alone unless `metrics=true`: then the generator reconstructs each face, the
reconstruction is written to `<output>/reconstructions/`, and PSNR / MSE / LPIPS / ID
similarity go into the table and the summary (mean / p50 / p95).

Counts (one per face): in = ok + failed + skipped.
"""
from __future__ import annotations

import logging
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.cli import main
from pipeline import delta, storage
from pipeline.compute import actor_pool, device_for, gpus_per_actor
from pipeline.images import hash_crops, load_crops
from pipeline.invert_stage import InvertBatch, lost_rows
from pipeline.models import model_shapes
from pipeline.runner import JobRun, TableSpec, WriteResult, run_summary
from pipeline.schemas import METRIC_COLUMNS, latents_schema

log = logging.getLogger("stbatch.invert")

JOB = "invert"
TABLE = "latents"

DEFAULTS = {
    "input": None,    # dataset root written by jobs.align, or a folder of aligned crops
    "output": None,   # dataset root for latents/, reconstructions/, _runs/
    "progress": True,
    "model": {
        "checkpoint": None,  # URI of the Style Transformer checkpoint (official layout)
        "sha256": None,      # verify the file when set
        "preset": None,      # without checkpoint: a seeded random model of this preset (tests)
        "seed": 0,
        "name": None,        # name written to the table (default: the file name)
    },
    "metrics": False,        # reconstruct and score every face
    "retry_failed": False,   # also retry permanent failures (decode_error ...); transient ones are always retried
    "metric_weights": {
        "lpips_alexnet": None,   # torchvision AlexNet state_dict URI (LPIPS backbone)
        "facenet": None,         # facenet-pytorch VGGFace2 InceptionResnetV1 state_dict URI
        "allow_random_init": False,  # tests only: random backbones, labelled in every row
        "skip_missing": False,       # leave a metric without weights uncomputed (null, labelled)
    },
    "invert": {
        "batch_size": 8,         # faces per model call (per actor)
        "concurrency": 1,        # inversion actors (int, or [min, max])
        "num_gpus": "auto",      # per actor: auto = 1 when the cluster has GPUs
        "num_cpus": 1,           # per actor (Ray's accounting; leave CPUs for the read stage)
        "torch_threads": 0,      # intra-op threads per actor on the CPU (0 = num_cpus)
        "device": "auto",
        "amp": "auto",           # auto (bf16 on CUDA, fp32 on CPU) | none | bf16 | fp16
        "load_batch_size": 16,   # crops per read/preprocess task
        "max_pixels": 64_000_000,
        "rows_per_part": 20_000, # latents rows per Parquet data file (the write stage's batch)
        "log_every_s": 30,
    },
    "testing": {"crash_once": None},  # {image_id, marker}: kill the actor once (retry test)
}


LATENT_KEY = ("image_id", "face_index")
WORK_COLUMNS = ["image_id", "face_index", "source_uri", "aligned_uri", "status"]


def _ok_faces(batch: pa.Table) -> pa.Table:
    t = batch.filter(pc.equal(batch.column("status"), "ok")).select(WORK_COLUMNS)
    return t.append_column("error", pa.nulls(t.num_rows, pa.string()))


def work_rows(src: str):
    """One row per face to invert, and how many: the committed `faces` table of an align output,
    or every file of a plain folder of aligned crops (read once; image_id = sha256 of the bytes)."""
    import ray

    faces = delta.read_snapshot(src, "faces", columns=WORK_COLUMNS)
    if faces is not None:
        ds = faces.map_batches(_ok_faces, batch_format="pyarrow")
        n = ds.count()
        log.info("input %s: %d aligned faces in the committed faces table", src, n)
        return ds, n
    files = storage.list_files(src)
    if not files:
        return None, 0
    log.info("input %s: plain folder of %d crops", src, len(files))
    paths, fs = storage.ray_paths(src, files)
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
    if fs is not None:  # keys without protocol -> URIs another process can open
        ds = ds.map_batches(_with_protocol, batch_format="numpy", fn_kwargs={"protocol": storage.protocol_of(src)})
    return ds.map_batches(hash_crops, batch_format="numpy", batch_size=64), len(files)


def _with_protocol(batch: dict, protocol: str) -> dict:
    return {**batch, "path": np.array([f"{protocol}://{p}" for p in batch["path"]], dtype=object)}


def build_dataset(work, cfg: dict, run_id: str, target_size: int | None):
    c = cfg["invert"]
    num_gpus = gpus_per_actor(c["num_gpus"])
    ds = work.map_batches(load_crops, batch_size=int(c["load_batch_size"]), batch_format="numpy",
                          fn_kwargs={"input_size": int(cfg["_input_size"]), "target_size": target_size,
                                     "max_pixels": int(c["max_pixels"])})
    kw = {"num_gpus": num_gpus} if num_gpus > 0 else {}
    return ds.map_batches(
        InvertBatch, batch_size=int(c["batch_size"]), batch_format="numpy", compute=actor_pool(c["concurrency"]),
        num_cpus=float(c["num_cpus"]), **kw,
        fn_constructor_kwargs={
            "model": cfg["model"], "run_id": run_id, "output": cfg["output"],
            "device": device_for(c["device"], num_gpus), "amp": c["amp"],
            "metrics": cfg["metric_weights"] if cfg["metrics"] else None,
            "torch_threads": int(c.get("torch_threads") or 0) or max(1, int(float(c["num_cpus"]))),
            "crash_once": (cfg.get("testing") or {}).get("crash_once"),
        })


def latents_table(shapes: dict) -> TableSpec:
    return TableSpec(TABLE, latents_schema(shapes["n_latent"], shapes["style_dim"]), LATENT_KEY)


def run(cfg: dict, before_commit=None) -> dict:
    import ray

    if not cfg.get("input") or not cfg.get("output"):
        raise SystemExit("invert: set input=URI and output=URI")
    c = cfg["invert"]
    shapes = model_shapes(cfg["model"])
    r = JobRun(cfg["output"], JOB, cfg, rows_per_file=int(c["rows_per_part"]), log_every_s=float(c["log_every_s"]))
    cfg = {**cfg, "_input_size": shapes["input_size"]}
    spec = latents_table(shapes)
    work, n_in = work_rows(cfg["input"])
    log.info("invert %s -> %s: %d faces, run %s", cfg["input"], cfg["output"], n_in, r.run_id)
    res = WriteResult()
    if work is not None:
        work = r.mark_done(work, spec, retry_failed=bool(cfg.get("retry_failed")))
        ds = build_dataset(work, cfg, r.run_id, shapes["pool_size"] if cfg["metrics"] else None)
        res = r.write(ds, spec, expected=n_in, inputs=work,
                      lost_rows=partial(lost_rows, n_latent=shapes["n_latent"], style_dim=shapes["style_dim"],
                                        run_id=r.run_id))
    counts = {"in": n_in, **res.counts}
    seconds = r.seconds()
    extra = {"faces_per_s": round((counts["ok"] + counts["failed"]) / max(seconds, 1e-9), 3),
             "model": shapes["name"], "statuses": res.statuses}
    if cfg["metrics"]:
        extra["metrics"] = run_summary(cfg["output"], TABLE, res.files, METRIC_COLUMNS)
    if before_commit is not None:
        before_commit(r)
    r.commit({spec: res}, {**counts, "seconds": seconds, **extra},
             extra={"inputs": {"input": cfg["input"]}, "checkpoint_sha256": shapes["sha256"],
                    "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


DESCRIPTION = __doc__


if __name__ == "__main__":
    main(JOB, DESCRIPTION, DEFAULTS, run)
