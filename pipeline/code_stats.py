"""Statistics of a dataset's codes, summed by Ray tasks and reduced in one task, for the quality
and directions jobs: the mean code, the sample covariance and its Ledoit-Wolf shrunk inverse, and
the mean / std of the reconstruction metrics.

    first = codes.map_batches(first_moments)             # tasks: n, sum of x, metric sums
    ref   = reduce_first.remote(refs)                    # one task: mean code, metric mean / std
    second = codes.map_batches(second_moments, [ref])     # tasks: centred outer products
    stats = reduce_second.remote(refs, ref)              # one task: covariance, shrunk precision

x is a face's W+ code averaged over its layers (the W the mapping network would give). The
shrunk covariance is S = (1 - s) C + s (tr C / p) I with the shrinkage s estimated from the data
(Ledoit & Wolf 2004, the formula scikit-learn's `ledoit_wolf` uses): with fewer faces than
dimensions the sample covariance C cannot be inverted, the shrunk one always can.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.fit_data import codes_to_numpy
from pipeline.schemas import unsliced
from pipeline.status import STATUS_OK

COLUMNS = ["image_id", "face_index", "status", "w_plus", "psnr", "lpips", "run_id"]
METRICS = ("psnr", "lpips")


def ok_codes(batch: pa.Table) -> tuple[pa.Table, np.ndarray]:
    t = unsliced(batch).filter(pc.equal(batch["status"], STATUS_OK))
    w = codes_to_numpy(t["w_plus"]).astype(np.float64) if t.num_rows else np.zeros((0, 0, 0))
    return t, w.mean(axis=1) if t.num_rows else np.zeros((0, 0))


def metric_values(t: pa.Table, name: str) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.cast(t[name], pa.float64()), np.nan).to_numpy(zero_copy_only=False), np.float64)


def first_moments(batch: pa.Table) -> pa.Table:
    t, x = ok_codes(batch)
    row = {"n": [len(x)], "sum": [x.sum(axis=0).tolist() if len(x) else []]}
    for m in METRICS:
        v = metric_values(t, m)
        v = v[np.isfinite(v)]
        row.update({f"{m}_n": [len(v)], f"{m}_sum": [float(v.sum())], f"{m}_sq": [float((v * v).sum())]})
    return pa.table(row, schema=FIRST_SCHEMA)  # typed: a block without ok codes (a failure file) has no sums


FIRST_SCHEMA = pa.schema([("n", pa.int64()), ("sum", pa.list_(pa.float64())),
                          *[f for m in METRICS for f in (pa.field(f"{m}_n", pa.int64()),
                                                         pa.field(f"{m}_sum", pa.float64()),
                                                         pa.field(f"{m}_sq", pa.float64()))]])
SECOND_SCHEMA = pa.schema([("xx", pa.list_(pa.float64())), ("x2x2", pa.list_(pa.float64()))])


def reduce_first(parts: list) -> dict:
    """Ray task: the mean code and the metrics' mean / std of the dataset."""
    import ray

    t = pa.concat_tables(ray.get(list(parts)))
    n = int(pc.sum(t["n"]).as_py())
    sums = [np.asarray(s, np.float64) for s in t["sum"].to_pylist() if s]
    out: dict[str, Any] = {"n": n, "mean": (np.sum(sums, axis=0) / max(n, 1)) if sums else None}
    for m in METRICS:
        k = int(pc.sum(t[f"{m}_n"]).as_py() or 0)
        if not k:
            out[m] = {"n": k, "mean": None, "std": None}
            continue
        mean = float(pc.sum(t[f"{m}_sum"]).as_py() or 0) / k
        var = float(pc.sum(t[f"{m}_sq"]).as_py() or 0) / k - mean * mean
        out[m] = {"n": k, "mean": mean, "std": float(np.sqrt(max(var, 0.0)))}
    return out


def second_moments(batch: pa.Table, first: list) -> pa.Table:
    """Centred sums of outer products: sum x x^T and sum (x^2)(x^2)^T (x centred), for the
    Ledoit-Wolf estimate."""
    import ray

    _, x = ok_codes(batch)
    mean = ray.get(first[0])["mean"]
    if not len(x):
        return pa.table({"xx": [[]], "x2x2": [[]]}, schema=SECOND_SCHEMA)
    xc = x - mean
    x2 = xc * xc
    return pa.table({"xx": [(xc.T @ xc).ravel().tolist()], "x2x2": [(x2.T @ x2).ravel().tolist()]},
                    schema=SECOND_SCHEMA)


def ledoit_wolf(n: int, xx: np.ndarray, x2x2: np.ndarray) -> tuple[np.ndarray, float]:
    """(shrunk covariance, shrinkage) from n and the centred sums (scikit-learn's formula)."""
    p = xx.shape[0]
    emp = xx / n
    mu = np.trace(emp) / p
    delta_ = (xx ** 2).sum() / n ** 2
    beta_ = x2x2.sum()
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * np.trace(xx) / n + p * mu ** 2) / p
    shrink = 0.0 if delta <= 0 else float(min(beta, delta) / delta)
    return (1.0 - shrink) * emp + shrink * mu * np.eye(p), shrink


def reduce_second(parts: list, first: dict) -> dict:
    """Ray task: the sample covariance, the inverse of the shrunk one and the shrinkage, beside
    the first moments."""
    import ray

    xx = x2x2 = None
    for t in ray.get(list(parts)):
        for a, b in zip(t["xx"].to_pylist(), t["x2x2"].to_pylist()):
            if not a:
                continue
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            xx = a if xx is None else xx + a
            x2x2 = b if x2x2 is None else x2x2 + b
    if xx is None or x2x2 is None:
        raise ValueError("reduce_second: no part holds second moments (no valid codes)")
    p = int(np.sqrt(xx.size))
    cov, shrink = ledoit_wolf(int(first["n"]), xx.reshape(p, p), x2x2.reshape(p, p))
    return {**first, "covariance": xx.reshape(p, p) / int(first["n"]), "precision": np.linalg.inv(cov),
            "shrinkage": shrink}
