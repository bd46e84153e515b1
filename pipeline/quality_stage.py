"""The quality job's rows: how atypical each face's code is, and how bad its reconstruction,
against the whole dataset (the statistics of pipeline.code_stats).

Atypicality is the Mahalanobis distance sqrt((x - mu)^T S^-1 (x - mu)) of the mean-over-layers
code under the Ledoit-Wolf shrunk covariance S. Reconstruction badness: z-scores of PSNR (low is
bad: (mean - psnr) / std) and LPIPS (high is bad) over the dataset's faces that have them
(latents written with `metrics=true`).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.code_stats import metric_values, ok_codes
from pipeline.schemas import make_table, quality_schema


def quality_rows(batch: pa.Table, model: list, run_id: str) -> pa.Table:
    """One `quality` row per ok face: Mahalanobis distance and the metrics' badness z-scores."""
    import ray

    m = ray.get(model[0])
    t, x = ok_codes(batch)
    xc = x - m["mean"] if len(x) else x
    maha = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", xc, m["precision"], xc), 0.0)) if len(x) else np.zeros(0)
    cols = {"image_id": t["image_id"].to_pylist(), "face_index": t["face_index"].to_pylist(),
            "status": ["ok"] * t.num_rows, "mahalanobis": maha.astype(np.float32),
            "latents_run_id": t["run_id"].to_pylist()}
    for name, sign in (("psnr", -1.0), ("lpips", 1.0)):
        v = metric_values(t, name)
        s = m[name]
        cols[name] = v.astype(np.float32)
        z = sign * (v - s["mean"]) / s["std"] if s["n"] and s["std"] else np.full(len(v), np.nan)
        cols[f"{name}_z"] = np.asarray(z, np.float32)
    return make_table(cols, quality_schema(), run_id)
