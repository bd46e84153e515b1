"""Quality job: atypical codes and bad reconstructions, one `quality` row per ok face.

    python -m jobs.quality --set input=URI [--set output=URI]

`input` is a dataset root with a committed `latents` table. For each ok face: `mahalanobis`,
the Mahalanobis distance of its code averaged over the layers from the dataset's mean, under a
Ledoit-Wolf shrunk covariance (pipeline.code_stats); and, where the latents row has
reconstruction metrics (jobs.invert with metrics=true), `psnr_z` and `lpips_z`: how much worse
than the dataset's average its reconstruction is, in standard deviations (high = worse).

    SELECT image_id, mahalanobis FROM quality ORDER BY mahalanobis DESC LIMIT 20   -- most atypical
    SELECT image_id, psnr, psnr_z FROM quality WHERE psnr_z > 2                   -- badly inverted

The statistics are computed by Ray tasks (sums per block, reduced in one task); the driver holds
references only. The table is recomputed whole (the statistics are the dataset's), replacing
each face's row; a run over the same committed latents version finds nothing to do. The
shrinkage and the face count are in the commit metadata and the summary.

Counts (one per ok code): in = ok + failed + skipped.
"""
from __future__ import annotations

import json
import logging

from jobs.cli import input_errors, main
from jobs.settings.quality import Settings
from pipeline import delta, recompute
from pipeline.code_stats import COLUMNS, first_moments, reduce_first, reduce_second, second_moments
from pipeline.errors import JobError
from pipeline.fit_data import read_latents
from pipeline.quality_stage import quality_rows
from pipeline.runner import JobRun, TableSpec, WriteResult
from pipeline.schemas import quality_schema

log = logging.getLogger("stbatch.quality")

JOB = "quality"
QUALITY = TableSpec("quality", quality_schema(), ("image_id", "face_index"))


SETTINGS = Settings


def check(cfg: Settings) -> list[str]:
    """Before Ray starts: the input root exists."""
    return input_errors("input", cfg.input)


def run(cfg: Settings, before_commit=None) -> dict:
    """The job body (also callable from Python; `before_commit(run)` is a test hook)."""
    import ray

    src_root = cfg.input
    if not src_root:
        raise JobError("input: set input=URI (a dataset root with a latents table)")
    output = cfg.output or src_root
    src = delta.open_table(src_root, "latents")
    if src is None:
        raise JobError(f"no committed latents table under {src_root}")
    version = src.version()
    del src
    r = JobRun(output, JOB, cfg, rows_per_file=cfg.rows_per_part)
    codes = read_latents(src_root, COLUMNS).materialize()
    first = ray.remote(reduce_first).remote(list(codes.map_batches(first_moments, batch_format="pyarrow")
                                                  .materialize().to_arrow_refs()))
    n = int(ray.get(ray.remote(lambda f: f["n"]).remote(first)))
    key = json.dumps({"job": JOB}, sort_keys=True)
    if n and recompute.up_to_date(output, QUALITY.name, version, key):
        log.info("quality: latents version %d is done: nothing to do", version)
        return {"run_id": r.run_id, "counts": {"in": n, "ok": 0, "failed": 0, "skipped": n}, "extra": {}}
    res, info = WriteResult(), {}
    if n:
        second = codes.map_batches(second_moments, batch_format="pyarrow", fn_kwargs={"first": [first]})
        model = ray.remote(reduce_second).remote(list(second.materialize().to_arrow_refs()), first)
        info = ray.get(ray.remote(lambda m: {"shrinkage": round(float(m["shrinkage"]), 6),
                                             "psnr": m["psnr"], "lpips": m["lpips"]}).remote(model))
        log.info("quality %s -> %s: %d faces, shrinkage %.4f, run %s", src_root, output, n, info["shrinkage"],
                 r.run_id)
        res = r.write(codes.map_batches(quality_rows, batch_format="pyarrow",
                                        fn_kwargs={"model": [model], "run_id": r.run_id}), QUALITY, expected=n)
    counts = {"in": n, **res.counts}
    extra = {"faces": n, **info}
    if before_commit is not None:
        before_commit(r)
    r.commit({QUALITY: res}, {**counts, "seconds": r.seconds(), **extra},
             extra={"inputs": {"input": src_root, "latents_version": version}, "ray": {"version": ray.__version__}},
             metadata={"shrinkage": str(info.get("shrinkage")), **recompute.inputs_metadata(version, key)})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


if __name__ == "__main__":
    main(JOB, __doc__, SETTINGS, run, check=check)
