"""Latent directions of a dataset, published as models that `jobs.edit` uses by name.

    stats = <pipeline.code_stats over the ok codes>                      # mean, covariance, precision
    sums = codes.map_batches(class_sums, labels)                         # tasks: per attribute and class
    rows = publish.remote(stats, sums refs, ...)                         # one task: files + models rows

Unsupervised (GANSpace, Harkonen et al. 2020): the principal axes of the codes averaged over
their layers, `pca_0` the axis of most variance. Supervised (InterFaceGAN, Shen et al. 2020): per
labelled attribute, the normal of the linear boundary between its two classes, here Fisher's
discriminant S^-1 (mu_1 - mu_0) with S the shrunk covariance of pipeline.code_stats (the total
covariance gives the same direction as the within-class one: they differ by a rank-one term
along mu_1 - mu_0). Every direction is stored as a [D] `.npy` file scaled to one standard
deviation of the dataset's codes along it, so an edit's `strength` is in standard deviations
whatever the direction; the sign of a supervised direction points to the attribute's presence.
"""
from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pyarrow as pa

from pipeline import model_registry, storage
from pipeline.code_stats import ok_codes
from pipeline.edit_sections import SweepSection
from pipeline.labels import labelled_codes_batch

KIND = "direction"
PCA_PREFIX = "pca_"


def class_sums(batch: pa.Table, labels_refs: list, join_on: str, shape: tuple[int, int]) -> pa.Table:
    """Per block: for every attribute, how many labelled codes of each class and their sums
    (codes averaged over layers; a missing label leaves a code out of that attribute only)."""
    t, _ = ok_codes(batch)
    d = labelled_codes_batch(t, labels_refs, join_on, 0.0, 0, "train", shape)
    x = d["w_plus"].astype(np.float64).mean(axis=1) if len(d["w_plus"]) else np.zeros((0, shape[1]))
    y = d["labels"]
    k = y.shape[1]
    n1, n0 = np.zeros(k), np.zeros(k)
    s1, s0 = np.zeros((k, shape[1])), np.zeros((k, shape[1]))
    for j in range(k):
        pos, neg = y[:, j] == 1, y[:, j] == 0
        n1[j], n0[j] = pos.sum(), neg.sum()
        s1[j], s0[j] = x[pos].sum(axis=0), x[neg].sum(axis=0)
    return pa.table({"n1": [n1.tolist()], "n0": [n0.tolist()], "s1": [s1.ravel().tolist()],
                     "s0": [s0.ravel().tolist()]})


def pca_directions(stats: dict, components: int) -> tuple[np.ndarray, np.ndarray]:
    """(directions [m, D] scaled to one standard deviation, explained variance ratio [m])."""
    vals, vecs = np.linalg.eigh(stats["covariance"])
    order = np.argsort(vals)[::-1][:components]
    vals = np.maximum(vals[order], 0.0)
    dirs = vecs[:, order].T * np.sqrt(vals)[:, None]
    # eigh's signs are arbitrary: each axis's largest component is made positive, so that a
    # rerun over the same codes publishes the same files
    flip = np.sign(dirs[np.arange(len(dirs)), np.abs(dirs).argmax(axis=1)])
    return dirs * flip[:, None], vals / max(float(np.trace(stats["covariance"])), 1e-12)


def boundary_directions(stats: dict, sums: list, names: list[str], min_class: int) -> tuple[dict, dict]:
    """({attribute: direction [D] scaled to one std}, {attribute: why none}) from the class sums."""
    import ray

    parts = ray.get(list(sums))
    k, dim = len(names), len(stats["mean"])
    n1, n0 = np.zeros(k), np.zeros(k)
    s1, s0 = np.zeros((k, dim)), np.zeros((k, dim))
    for t in parts:
        for a, b, c, d in zip(t["n1"].to_pylist(), t["n0"].to_pylist(), t["s1"].to_pylist(), t["s0"].to_pylist()):
            n1 += a
            n0 += b
            s1 += np.asarray(c).reshape(k, dim)
            s0 += np.asarray(d).reshape(k, dim)
    out, skipped = {}, {}
    for j, name in enumerate(names):
        if min(n1[j], n0[j]) < min_class:
            skipped[name] = f"{int(n1[j])} positive and {int(n0[j])} negative labelled codes, fewer than {min_class}"
            continue
        n = stats["precision"] @ (s1[j] / n1[j] - s0[j] / n0[j])
        n /= np.linalg.norm(n)
        out[name] = n * np.sqrt(max(float(n @ stats["covariance"] @ n), 0.0))
    return out, skipped


def publish(stats: dict, sums: list | None, names: list[str], components: int, min_class: int, output: str,
            run_id: str) -> dict:
    """Ray task: every direction written as `model_files/direction/<run_id>/<name>.npy`; returns
    the `models` rows to commit, the explained variance of the PCA axes and the attributes left
    out (with why)."""
    from stmodel.checkpoint import sha256_bytes

    dirs, ratio = pca_directions(stats, components)
    named = {f"{PCA_PREFIX}{i}": d for i, d in enumerate(dirs)}
    skipped: dict[str, str] = {}
    if sums is not None:
        sup, skipped = boundary_directions(stats, sums, names, min_class)
        named.update(sup)
    rows = []
    for name, d in named.items():
        buf = io.BytesIO()
        np.save(buf, d.astype(np.float32), allow_pickle=False)
        file_name = f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)}.npy"
        uri = storage.join(output, model_registry.model_key(KIND, run_id, file_name))
        storage.write_bytes(uri, buf.getvalue())
        rows.append({"uri": uri, "kind": KIND, "attribute": name, "sha256": sha256_bytes(buf.getvalue())})
    return {"rows": rows, "explained_variance_ratio": [round(float(r), 5) for r in ratio], "skipped": skipped}


def resolve(root: str, name: str, run_id: str | None = None) -> dict:
    """The committed direction `name` (pca_0, an attribute) under a dataset root: the newest, or
    that of `run_id`. Raises LookupError naming what exists."""
    try:
        return model_registry.resolve(root, KIND, name, run_id=run_id)
    except LookupError:
        have = sorted({m["attribute"] for m in model_registry.committed_models(root, KIND)})
        raise LookupError(f"no committed direction {name!r} under {root}"
                          + (f" from run {run_id}" if run_id else "")
                          + f"; committed: {', '.join(have) or 'none'} (jobs.fit_directions makes them)") from None


def named_direction_sweep(name: str, root: str, sweep: SweepSection, run_id: str | None = None) -> SweepSection:
    """jobs.edit's `direction=NAME`: `sweep` with the committed direction of that name under
    `root` (the newest, or that of `run_id`) as its one direction file and [direction] as its
    kinds; a direction named after an attribute also becomes the sweep's attribute (its
    classifier logits are recorded) unless the sweep names some. The job allows `root` as a
    direction prefix. Raises LookupError when no such direction is committed."""
    m = resolve(root, name, run_id=run_id)
    attributes = sweep.attributes if sweep.attributes or name.startswith(PCA_PREFIX) else [name]
    return dataclasses.replace(sweep, kinds=["direction"], direction_uris=[m["uri"]], attributes=attributes)
