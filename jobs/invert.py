"""Invert job: aligned face crops -> the `latents` table (one W+ code per face).

    python -m jobs.invert --set input=URI --set output=URI --set model.checkpoint=URI [--set metrics=true]

`input` is either the output of `jobs.align` (its committed `faces` table is read: every face
with status ok) or a plain folder of aligned crops (each file one face; image_id = sha256 of
its bytes, found in a first hashing pass). Faces whose (image_id, face_index) is already in a
committed `latents` run under `output` are skipped, so a nightly rerun over a growing prefix
inverts only what is new, and a crashed run (no manifest) is simply done again.

The encoder runs alone unless `metrics=true`: then the generator reconstructs each face, the
reconstruction is written to `<output>/reconstructions/`, and PSNR / MSE / LPIPS / ID
similarity go into the table and the summary (mean / p50 / p95).

Counts (one per face): in = ok + failed + skipped.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.cli import main
from pipeline import storage
from pipeline.compute import actor_pool, device_for, gpus_per_actor
from pipeline.invert_stage import InvertBatch, hash_batch, load_crops
from pipeline.schemas import METRIC_COLUMNS, latents_schema, make_table

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
        "rows_per_part": 20_000, # latents rows per Parquet part
        "log_every_s": 30,
    },
    "testing": {"crash_once": None},  # {image_id, marker}: kill the actor once (retry test)
}


def discover(cfg: dict) -> tuple[list[dict], int]:
    """Work items (one per face) and how many duplicates were dropped."""
    src = cfg["input"]
    faces = storage.read_committed(src, "faces", columns=["image_id", "face_index", "source_uri",
                                                         "status", "aligned_uri"])
    if faces is not None:
        faces = faces.filter(pc.equal(faces["status"], "ok"))
        items = faces.select(["image_id", "face_index", "source_uri", "aligned_uri"]).to_pylist()
        log.info("input %s: %d aligned faces from committed align runs", src, len(items))
        return _dedupe(items)
    import ray

    files = storage.list_files(src)
    if not files:
        return [], 0
    log.info("input %s: plain folder of %d crops, hashing", src, len(files))
    paths, fs = storage.ray_paths(src, files)
    uri_of = dict(zip(paths, files))
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
    hashed = ds.map_batches(hash_batch, batch_format="numpy", batch_size=64).take_all()
    seen = {h["path"]: h["image_id"] for h in hashed}
    items = []
    for p in paths:
        uri = uri_of[p]
        iid = seen.get(p)
        items.append({"image_id": iid, "face_index": 0, "source_uri": uri, "aligned_uri": uri})
    return _dedupe(items)


def _dedupe(items: list[dict]) -> tuple[list[dict], int]:
    out, keys = [], set()
    for it in items:
        k = (it["image_id"], int(it["face_index"] or 0))
        if it["image_id"] is not None and k in keys:
            continue
        keys.add(k)
        out.append(it)
    return out, len(items) - len(out)


def build_dataset(items: list[dict], cfg: dict, run: storage.Run, target_size: int | None):
    import ray

    c = cfg["invert"]
    num_gpus = gpus_per_actor(c["num_gpus"])
    ds = ray.data.from_items(items)
    ds = ds.map_batches(load_crops, batch_size=int(c["load_batch_size"]), batch_format="numpy",
                        fn_kwargs={"input_size": int(cfg["_input_size"]), "target_size": target_size,
                                   "max_pixels": int(c["max_pixels"])})
    kw = {"num_gpus": num_gpus} if num_gpus > 0 else {}
    return ds.map_batches(
        InvertBatch, batch_size=int(c["batch_size"]), batch_format="numpy", compute=actor_pool(c["concurrency"]),
        num_cpus=float(c["num_cpus"]), **kw,
        fn_constructor_kwargs={
            "model": cfg["model"], "run_id": run.run_id, "output": cfg["output"],
            "device": device_for(c["device"], num_gpus), "amp": c["amp"],
            "metrics": cfg["metric_weights"] if cfg["metrics"] else None,
            "torch_threads": int(c.get("torch_threads") or 0) or max(1, int(float(c["num_cpus"]))),
            "crash_once": (cfg.get("testing") or {}).get("crash_once"),
        })


def model_shapes(spec: dict) -> dict:
    """Sizes and identity the driver needs, without building the model."""
    from pipeline.models import describe_model

    mc, info = describe_model(spec)
    return {"input_size": mc.input_size, "pool_size": mc.pool_size, "n_latent": mc.n_latent,
            "style_dim": mc.style_dim, "name": info["name"], "sha256": info["sha256"]}


def metric_summary(parts: list[pa.Table]) -> dict:
    from stmodel.metrics import summarize

    out = {}
    if not parts:
        return out
    t = pa.concat_tables(parts)
    for col in METRIC_COLUMNS:
        v = t[col].to_numpy(zero_copy_only=False).astype(np.float64)
        out[col] = {k: (round(x, 4) if isinstance(x, float) else x) for k, x in summarize(v).items()}
    labels = [x for x in t["metric_backbones"].unique().to_pylist() if x]
    out["backbones"] = labels
    return out


def run(cfg: dict, before_commit=None) -> dict:
    import ray

    if not cfg.get("input") or not cfg.get("output"):
        raise SystemExit("invert: set input=URI and output=URI")
    c = cfg["invert"]
    t0 = time.time()
    r = storage.Run(cfg["output"], JOB, cfg)
    r.sweep_uncommitted([TABLE])
    shapes = model_shapes(cfg["model"])
    cfg = {**cfg, "_input_size": shapes["input_size"]}
    items, dups = discover(cfg)
    n_in = len(items) + dups
    done = storage.read_committed(cfg["output"], TABLE, columns=["image_id", "face_index"])
    done_keys = set(zip(done["image_id"].to_pylist(), done["face_index"].to_pylist())) if done is not None else set()
    todo = [it for it in items if (it["image_id"], int(it["face_index"])) not in done_keys]
    skipped = dups + len(items) - len(todo)
    log.info("invert %s -> %s: %d faces, %d skipped (already committed or duplicate), %d to do, run %s",
             cfg["input"], cfg["output"], n_in, skipped, len(todo), r.run_id)
    counts = {"in": n_in, "ok": 0, "failed": 0, "skipped": skipped}
    metric_parts: list[pa.Table] = []
    returned: set = set()
    pending: list[pa.Table] = []
    pending_rows, part, last = 0, 0, time.time()
    if todo:
        ds = build_dataset(todo, cfg, r, shapes["pool_size"] if cfg["metrics"] else None)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if batch.num_rows == 0:
                continue
            st = batch["status"].to_pylist()
            counts["ok"] += st.count("ok")
            counts["failed"] += len(st) - st.count("ok")
            returned.update(zip(batch["image_id"].to_pylist(), batch["face_index"].to_pylist()))
            pending.append(batch)
            pending_rows += batch.num_rows
            if cfg["metrics"]:
                metric_parts.append(batch.select([*METRIC_COLUMNS, "metric_backbones"]))
            if pending_rows >= int(c["rows_per_part"]):
                r.write_table(TABLE, pa.concat_tables(pending), part=part)
                part, pending, pending_rows = part + 1, [], 0
            if time.time() - last >= float(c["log_every_s"]):
                last = time.time()
                done_n = counts["ok"] + counts["failed"]
                log.info("invert progress: %d/%d faces (ok %d, failed %d), %.2f faces/s", done_n, len(todo),
                         counts["ok"], counts["failed"], done_n / max(time.time() - t0, 1e-9))
        if pending:
            r.write_table(TABLE, pa.concat_tables(pending), part=part)
    lost = [it for it in todo if (it["image_id"], int(it["face_index"])) not in returned]
    if lost:  # never silently dropped: a face that did not come back is a failed row
        log.error("%d faces did not come back from the pipeline", len(lost))
        counts["failed"] += len(lost)
        schema = latents_schema(shapes["n_latent"], shapes["style_dim"])
        cols = {k: [it[k] for it in lost] for k in ("image_id", "face_index", "source_uri", "aligned_uri")}
        cols.update(status=["invert_error"] * len(lost), error=["row lost by the pipeline"] * len(lost))
        w = np.zeros((len(lost), shapes["n_latent"], shapes["style_dim"]), np.float32)
        r.write_table(TABLE, make_table(cols, schema, r.run_id, w_plus=w, ok=np.zeros(len(lost), bool)), part=part + 1)
    seconds = time.time() - t0
    extra = {"faces_per_s": round((counts["ok"] + counts["failed"]) / max(seconds, 1e-9), 3),
             "model": shapes["name"]}
    if cfg["metrics"]:
        extra["metrics"] = metric_summary(metric_parts)
    if before_commit is not None:
        before_commit(r)
    r.commit({**counts, "seconds": round(seconds, 2), **extra},
             extra={"inputs": {"input": cfg["input"]}, "checkpoint_sha256": shapes["sha256"],
                    "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


DESCRIPTION = __doc__


if __name__ == "__main__":
    main(JOB, DESCRIPTION, DEFAULTS, run)
