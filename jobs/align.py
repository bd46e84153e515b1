"""Align job: raw photos -> FFHQ-aligned crops + the `faces` table.

    python -m jobs.align --config FILE --set input=URI --set output=URI [--set align.size=256]

Reads every file under `input` (hidden `_*` / `.*` names skipped), hashes it (image_id = sha256
of the bytes), skips image_ids already in a committed run under `output` (any status), decodes
and detects/aligns the rest as Ray Data stages, writes crops to `<output>/aligned/` and the
`faces` rows to `<output>/faces/run=<run_id>/`, then publishes the run with its manifest.

Counts (one per input file, however many faces it has):
  in      files listed under `input`
  ok      files that produced at least one aligned face (status ok)
  failed  files with a failure status (decode_error, too_large, too_small, no_face, align_error, read_error)
  skipped files whose image_id is already committed, or that duplicate another file of this run
in = ok + failed + skipped.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from jobs.cli import main
from pipeline import storage
from pipeline.compute import actor_pool, device_for, gpus_per_actor
from pipeline.align_stage import AlignFaces, decode_batch, sorted_id_array
from pipeline.schemas import FACE_STATUS_DUPLICATE, FACE_STATUS_OK, FACE_STATUS_SKIPPED, faces_table

log = logging.getLogger("stbatch.align")

JOB = "align"
TABLE = "faces"

DEFAULTS = {
    "input": None,    # URI of the raw photos (folder / prefix)
    "output": None,   # URI of the dataset root (aligned/, faces/, _runs/)
    "progress": True,
    "align": {
        "size": 1024,                 # output side (256 for the encoder)
        "supersample": 4,             # FFHQ: transform at 4x, then Lanczos down
        "face_policy": "largest",     # largest | all
        "min_score": 0.9,             # detector score a face must reach
        "min_face_px": 32,            # shorter box side a face must reach (else too_small)
        "max_faces": 16,              # cap per image with face_policy=all
        "max_pixels": 64_000_000,     # refuse images declaring more (checked on the header)
        "min_image_side": 32,         # refuse images smaller than this
        "detect_max_side": 1024,      # detection runs on a copy downscaled to this longer side
        "mtcnn_min_face": 20,         # MTCNN's pyramid floor (pixels of the detection copy)
        "mtcnn_thresholds": [0.6, 0.7, 0.7],
        "refine_passes": 1,           # re-detect landmarks on the first upright crop (3x steadier quads)
        "png_compress_level": 1,      # 0-9: 1 is ~5x faster than 6 for ~15% larger files
        "decode_batch_size": 8,       # files per decode task batch
        "batch_size": 8,              # images per AlignFaces call
        "concurrency": 1,             # AlignFaces actors (int, or [min, max] to autoscale)
        "num_cpus": 1,                # CPUs per AlignFaces actor (also its torch threads)
        "num_gpus": "auto",           # GPUs per actor: auto = 1 each when the cluster has GPUs, else 0
        "device": "auto",             # auto | cpu | cuda
        "rows_per_part": 100_000,     # faces rows per Parquet part
        "log_every_s": 30,            # progress line interval
    },
}


def build_dataset(files: list[str], cfg: dict, run: storage.Run, skip_ids: np.ndarray):
    """The Ray Data plan: read bytes -> decode (tasks) -> detect + align (actors)."""
    import ray

    a = cfg["align"]
    protocol = storage.protocol_of(cfg["input"])
    local = protocol == "file"
    paths, fs = storage.ray_paths(cfg["input"], files)
    num_gpus = gpus_per_actor(a.get("num_gpus", "auto"))
    device = device_for(a["device"], num_gpus)
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs, ignore_missing_paths=True)
    ds = ds.map_batches(decode_batch, batch_size=int(a["decode_batch_size"]), batch_format="numpy",
                        fn_kwargs={"max_pixels": int(a["max_pixels"]), "min_side": int(a["min_image_side"]),
                                   "skip_ids": skip_ids, "protocol": None if local else protocol})
    kw = {}
    if num_gpus > 0:
        kw["num_gpus"] = num_gpus
    ds = ds.map_batches(
        AlignFaces, batch_size=int(a["batch_size"]), batch_format="numpy", compute=actor_pool(a["concurrency"]),
        num_cpus=float(a["num_cpus"]), **kw,
        fn_constructor_kwargs={
            "output": cfg["output"], "run_id": run.run_id, "size": int(a["size"]),
            "supersample": int(a["supersample"]), "face_policy": a["face_policy"],
            "min_score": float(a["min_score"]), "min_face_px": float(a["min_face_px"]),
            "max_faces": int(a["max_faces"]), "device": device, "detect_max_side": a["detect_max_side"],
            "mtcnn_min_face": int(a["mtcnn_min_face"]), "mtcnn_thresholds": list(a["mtcnn_thresholds"]),
            "detect_batch": int(a["batch_size"]), "png_compress_level": int(a["png_compress_level"]),
            "refine_passes": int(a["refine_passes"]), "torch_threads": max(1, int(float(a["num_cpus"]))),
        })
    return ds


class _Tally:
    """Per-file accounting and Parquet parts, fed with the stage's output batches."""

    def __init__(self, run: storage.Run, rows_per_part: int):
        self.run, self.rows_per_part = run, int(rows_per_part)
        self.status_of: dict[str, str] = {}     # source_uri -> file-level outcome
        self.id_source: dict[str, str] = {}     # image_id -> first source_uri in this run
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.parts = 0
        self.faces_ok = 0

    def add(self, t: pa.Table) -> None:
        if t.num_rows == 0:
            return
        ids = t["image_id"].to_pylist()
        srcs = t["source_uri"].to_pylist()
        sts = t["status"].to_pylist()
        keep = np.ones(t.num_rows, dtype=bool)
        dup_rows = []
        # Rows of one source file arrive together (one input row -> its face rows in one batch).
        by_src: dict[str, list[int]] = {}
        for i, s in enumerate(srcs):
            by_src.setdefault(s, []).append(i)
        for src, idx in by_src.items():
            iid = ids[idx[0]]
            statuses = {sts[i] for i in idx}
            if FACE_STATUS_SKIPPED in statuses:
                self.status_of[src] = "skipped"
                keep[idx] = False
                continue
            first = self.id_source.get(iid)
            if first is not None and first != src:
                self.status_of[src] = "skipped"
                keep[idx] = False
                dup_rows.append({"image_id": iid, "source_uri": src, "status": FACE_STATUS_DUPLICATE,
                                 "error": f"same bytes as {first} (already in this run)"})
                continue
            self.id_source[iid] = src
            n_ok = sum(1 for i in idx if sts[i] == FACE_STATUS_OK)
            self.faces_ok += n_ok
            # (should Ray ever split one file's rows over two batches, an ok part wins)
            self.status_of[src] = "ok" if n_ok or self.status_of.get(src) == "ok" else "failed"
        kept = t.filter(pa.array(keep))
        if dup_rows:
            kept = pa.concat_tables([kept, faces_table(dup_rows, self.run.run_id)])
        self._push(kept)

    def _push(self, t: pa.Table) -> None:
        if t.num_rows:
            self.pending.append(t)
            self.pending_rows += t.num_rows
        if self.pending_rows >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        self.run.write_table(TABLE, pa.concat_tables(self.pending).combine_chunks(), part=self.parts)
        self.parts += 1
        self.pending, self.pending_rows = [], 0

    def counts(self, n_in: int) -> dict:
        vals = list(self.status_of.values())
        return {"in": n_in, "ok": vals.count("ok"), "failed": vals.count("failed"), "skipped": vals.count("skipped")}


def run(cfg: dict, before_commit=None) -> dict:
    """The job body (also callable from Python; `before_commit(run)` is a test hook)."""
    import ray

    if not cfg.get("input") or not cfg.get("output"):
        raise SystemExit("align: set input=URI and output=URI (--set input=... --set output=...)")
    a = cfg["align"]
    if a["face_policy"] not in ("largest", "all"):
        raise SystemExit(f"align.face_policy must be 'largest' or 'all', got {a['face_policy']!r}")
    t0 = time.time()
    r = storage.Run(cfg["output"], JOB, cfg)
    r.sweep_uncommitted([TABLE])
    files = storage.list_files(cfg["input"])
    done = storage.committed_values(cfg["output"], TABLE, "image_id")
    log.info("align %s -> %s: %d files, %d image_ids already committed, run %s",
             cfg["input"], cfg["output"], len(files), len(done), r.run_id)
    tally = _Tally(r, a["rows_per_part"])
    if files:
        ds = build_dataset(files, cfg, r, sorted_id_array(done))
        last = time.time()
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            tally.add(batch)
            if time.time() - last >= float(a["log_every_s"]):
                last = time.time()
                c = tally.counts(len(files))
                log.info("align progress: %d/%d files (ok %d, failed %d, skipped %d), %.1f files/s",
                         len(tally.status_of), len(files), c["ok"], c["failed"], c["skipped"],
                         len(tally.status_of) / max(time.time() - t0, 1e-9))
    # Files listed but never read (deleted meanwhile): account for them too.
    missing = [u for u in files if u not in tally.status_of]
    if missing:
        tally._push(faces_table([{"image_id": "", "source_uri": u, "status": "read_error",
                                  "error": "file listed but could not be read (deleted or unreadable)"}
                                 for u in missing], r.run_id))
        for u in missing:
            tally.status_of[u] = "failed"
    tally.flush()
    counts = tally.counts(len(files))
    seconds = time.time() - t0
    if before_commit is not None:
        before_commit(r)
    summary = {**counts, "faces": tally.faces_ok, "seconds": round(seconds, 2)}
    r.commit(summary, extra={"inputs": {"input": cfg["input"], "files": len(files)},
                             "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": {"faces": tally.faces_ok}}


def cli(argv: list[str] | None = None) -> dict:
    return main(JOB, "Detect and FFHQ-align faces: raw photos -> aligned crops + faces table.", DEFAULTS, run,
                argv=argv)


if __name__ == "__main__":
    cli()
