"""Neighbors job: the k nearest faces of every face in a space, and groups of near-duplicates.

    python -m jobs.neighbors --set input=URI [--set output=URI] [--set space=wplus|identity] \\
        [--set layers=[0,4]] [--set k=10] [--set threshold=0.02]

Spaces: `wplus` (default): each ok code of the `latents` table averaged over its layers (or over
the layer range `layers: [a, b)`), Euclidean distance; `identity`: the `embeddings` table
(jobs.embed), cosine distance (1 - cosine similarity).

The vectors are read by Ray tasks and kept in the object store; one task builds a faiss index
over them (exact `flat` search below `index.exact_below` vectors, else `ivf`: IndexIVFFlat with
2 sqrt(n) lists, `index.nprobe` (8) searched; or `hnsw`), serialises it and puts it in the
object store, where every actor of the search pool reads it once. The driver holds references,
never a vector.

Outputs (Delta tables under `output`, default `input`; one commit each, with `space`,
`threshold` and the settings in the commit metadata):

  neighbors         space, image_id, face_index, rank (1 = nearest), neighbor_image_id,
                    neighbor_face_index, distance
  duplicate_groups  every face of the space: group_id, group_size (1 = no near-duplicate),
                    representative_image_id / _face_index (the group's smallest key), threshold

A group is a connected component of the pairs closer than `threshold` among each face's k
nearest neighbours (union-find in one task over the pair list). The default space and threshold
(`wplus`, 0.02) were chosen on planted near-duplicates (60 distinct photos, 20 of them also
re-encoded as JPEG q60, scaled by 0.8 and cropped by 2-5 %) after a plain jobs.invert with the
project's seeded tiny-32 model: at 0.02, recall 0.85 and precision 0.895 of the planted pairs
(the best of both over thresholds; the seeded random encoder does not separate a copy from a
distinct photo of similar colours well, README, Analytics). `identity` has no default: the
seeded random FaceNet puts every crop within 1e-5 of every other (cosine), which says nothing
of the real backbone; set `threshold` for the weights you use.

A face's rows of a space are replaced by the next run's. A run over the same committed source
table version with the same settings finds everything done and commits nothing (all skipped).

Counts (one per face with a vector): in = ok + failed + skipped.
"""
from __future__ import annotations

import json
import logging

from jobs.cli import main
from jobs.settings.neighbors import Settings
from pipeline import delta, recompute, storage, vector_index
from pipeline.compute import actor_pool
from pipeline.neighbors_stage import (
    SPACES,
    SearchBatch,
    build_index_task,
    close_pairs,
    count_vectors,
    group_pairs_task,
    group_rows,
    group_stats,
    metric_of,
    space_name,
    vectors,
)
from pipeline.runner import JobRun, TableSpec, WriteResult
from pipeline.schemas import duplicate_groups_schema, neighbors_schema

log = logging.getLogger("stbatch.neighbors")

JOB = "neighbors"
NEIGHBORS = TableSpec("neighbors", neighbors_schema(), ("space", "image_id", "face_index", "rank"),
                      replace_key=("space", "image_id", "face_index"))
GROUPS = TableSpec("duplicate_groups", duplicate_groups_schema(), ("space", "image_id", "face_index"))
DEFAULT_THRESHOLDS = {"wplus": 0.02}


SETTINGS = Settings


def _settings_key(cfg: dict, name: str, threshold: float) -> str:
    ix = cfg["index"]
    return json.dumps({"space": name, "k": int(cfg["k"]), "threshold": threshold, "kind": ix["kind"],
                       "exact_below": ix["exact_below"], "nlist": ix["nlist"], "nprobe": ix["nprobe"]}, sort_keys=True)


def run(cfg: dict, before_commit=None) -> dict:
    """The job body (also callable from Python; `before_commit(run)` is a test hook)."""
    import ray

    if not cfg.get("input"):
        raise SystemExit("neighbors: set input=URI")
    space, layers = cfg["space"], cfg.get("layers")
    if layers is not None and (layers[0] < 0 or layers[1] <= layers[0]):
        raise SystemExit(f"neighbors: layers must be [a, b) with 0 <= a < b, got {layers}")
    output = cfg.get("output") or cfg["input"]
    name, metric = space_name(space, layers), metric_of(space)
    if cfg.get("threshold") is None and space not in DEFAULT_THRESHOLDS:
        raise SystemExit(f"neighbors: space={space} has no default threshold: set threshold=DISTANCE")
    threshold = float(cfg["threshold"] if cfg.get("threshold") is not None else DEFAULT_THRESHOLDS[space])
    table = SPACES[space][0]
    src = delta.open_table(cfg["input"], table)
    if src is None:
        hint = " (run jobs.embed first)" if space == "identity" else ""
        raise SystemExit(f"neighbors: no committed {table} table under {cfg['input']}{hint}")
    source_version = src.version()
    del src
    s, ix = cfg["search"], cfg["index"]
    r = JobRun(output, JOB, cfg, rows_per_file=int(s["rows_per_part"]), log_every_s=float(s["log_every_s"]))
    vec = vectors(cfg["input"], space, layers).materialize()
    n, dim = count_vectors(vec)
    key = _settings_key(cfg, name, threshold)
    if n and recompute.up_to_date(output, NEIGHBORS.name, source_version, key, {"space": name}):
        log.info("neighbors: %s version %d was searched with the same settings: nothing to do", table, source_version)
        return {"run_id": r.run_id, "counts": {"in": n, "ok": 0, "failed": 0, "skipped": n}, "extra": {"space": name}}
    kind = vector_index.choose_kind(n, ix["kind"], int(ix["exact_below"]))
    log.info("neighbors %s -> %s: %d faces, %d-d %s vectors of %s (%s), %s index, k=%d, threshold %g, run %s",
             cfg["input"], output, n, dim, name, table, metric, kind, int(cfg["k"]), threshold, r.run_id)
    res, gres, stats = WriteResult(), WriteResult(), {"faces": 0, "groups": 0}
    if n >= 2:
        build = ray.remote(build_index_task).options(num_cpus=float(ix["build_cpus"]), num_returns=3)
        index_ref, ids_ref, center_ref = build.remote(list(vec.to_arrow_refs()), metric, kind, ix["nlist"], int(ix["nprobe"]),
                                          int(ix["threads"]))
        rows = vec.map_batches(SearchBatch, batch_size=int(s["batch_size"]), batch_format="pyarrow",
                               compute=actor_pool(s["concurrency"]), num_cpus=float(s["num_cpus"]),
                               fn_constructor_kwargs={"index": [index_ref], "ids": [ids_ref],
                                                      "center": [center_ref], "k": int(cfg["k"]),
                                                      "metric": metric, "space": name, "run_id": r.run_id,
                                                      "nprobe": int(ix["nprobe"]), "threads": int(ix["threads"])})
        res = r.write(rows, NEIGHBORS, expected=n)
        del index_ref, ids_ref, center_ref
        root = delta.table_root(output, NEIGHBORS.name)
        fields = [NEIGHBORS.schema.field(c) for c in ("image_id", "face_index", "neighbor_image_id",
                                                      "neighbor_face_index", "distance")]
        pairs = delta.read_files([storage.join(root, f.path) for f in res.files], fields).map_batches(
            close_pairs, batch_format="pyarrow", fn_kwargs={"threshold": threshold}).materialize()
        groups_ref = ray.remote(group_pairs_task).remote(list(pairs.to_arrow_refs()))
        faces = vec.map_batches(group_rows, batch_format="pyarrow", fn_kwargs={
            "groups": [groups_ref], "space": name, "threshold": threshold, "run_id": r.run_id})
        gres = r.write(faces, GROUPS, expected=n)
        stats = ray.get(ray.remote(group_stats).remote(groups_ref))
    counts = {"in": n, **res.counts}
    seconds = r.seconds()
    extra = {"space": name, "metric": metric, "index": kind, "k": int(cfg["k"]), "threshold": threshold,
             "duplicate_groups": stats["groups"], "faces_in_groups": stats["faces"],
             "faces_per_s": round(n / max(seconds, 1e-9), 3)}
    if before_commit is not None:
        before_commit(r)
    results = {NEIGHBORS: res, GROUPS: gres} if n >= 2 else {}
    r.commit(results, {**counts, "seconds": seconds, **extra},
             extra={"inputs": {"input": cfg["input"], "table": table, "version": source_version},
                    "ray": {"version": ray.__version__}},
             metadata={"space": name, "threshold": str(threshold), **recompute.inputs_metadata(source_version, key)})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


if __name__ == "__main__":
    main(JOB, __doc__, SETTINGS, run)
