"""Neighbors job: the k nearest faces of every face in a space, and groups of near-duplicates.

    python -m jobs.neighbors --set input=URI [--set output=URI] [--set space=crop|wplus|identity] \\
        [--set layers=[0,4]] [--set k=10] [--set ratio=0.45 | --set threshold=0.05]

Spaces: `crop` (default): each ok face of the `latents` table as an 8x8 RGB thumbnail of the
central 80 % of its crop (`aligned_uri`, read by the tasks), Euclidean distance / sqrt(192): the
RMS pixel difference in [0, 1]; `wplus`: each ok code averaged over its layers (or over the
layer range `layers: [a, b)`), Euclidean distance; `identity`: the `embeddings` table
(jobs.embed), cosine distance (1 - cosine similarity).

The vectors are read by Ray tasks and kept in the object store; one task builds a faiss index
over them (exact `flat` search below `index.exact_below` vectors, else `ivf`: IndexIVFFlat with
2 sqrt(n) lists, `index.nprobe` (4) searched; or `hnsw`), serialises it and puts it in the
object store, where every actor of the search pool reads it once. The driver holds references,
never a vector.

Outputs (Delta tables under `output`, default `input`; one commit each, with `space`, the rule
(`rule`: ratio | threshold, `ratio`, `threshold`) and the settings in the commit metadata):

  neighbors         space, image_id, face_index, rank (1 = nearest), neighbor_image_id,
                    neighbor_face_index, distance
  duplicate_groups  every face of the space: group_id, group_size (1 = no near-duplicate),
                    representative_image_id / _face_index (the group's smallest key), threshold
                    (the face's resolved absolute threshold)

A group is a connected component of the near-duplicate pairs among each face's nearest
neighbours (union-find in one task over the pair list). A pair is near-duplicate by
  the ratio rule (default, `threshold` null): a and b are each other's 1st or 2nd neighbour and
      their distance is below `ratio` (0.45) times a's distance to its 3rd nearest neighbour and
      below `ratio` times b's; each face's resolved threshold (ratio x that distance) is its
      `threshold` in duplicate_groups, their median the commit's `threshold`. It does not depend
      on the space's scale, so one default fits every encoder and the pixels; or
  an absolute `threshold`: distance below it, among the k nearest.

The defaults (`crop`, ratio 0.45) were chosen on planted near-duplicates, each photo also
re-encoded as JPEG q60, scaled by 0.8 and cropped by 2-5 % a side (README, Analytics): 60
distinct photo windows with 20 copies after a plain jobs.invert with the seeded tiny-32 model,
recall 1.00 and precision 1.00 of the planted pairs; the demo's 144 generator images with 12
copies (its trained encoder), 1.00 and 1.00; no pair at all among the distinct photos alone.
Copies sat at 0.39 x the 3rd-neighbour distance at most, distinct faces from 0.53. No W+
reduction came near: the seeded random encoder and the demo's briefly trained one put some
distinct photos closer than copies (the best of recall and precision over W+ reductions, ratio
rules and thresholds, one setting for both corpora: 0.85 / 0.89 seeded, 0.83 / 0.91 demo).
`identity` with the seeded random FaceNet puts every crop within 1e-5 of every other (cosine),
which says nothing of the real backbone.

A face's rows of a space are replaced by the next run's. A run over the same committed source
table version with the same settings finds everything done and commits nothing (all skipped).

Counts (one per face with a vector): in = ok + failed + skipped.
"""
from __future__ import annotations

import json
import logging

from jobs.cli import input_errors, main
from jobs.settings.neighbors import Settings
from pipeline import delta, recompute, storage, vector_index
from pipeline.compute import actor_pool, check_room_for_tasks
from pipeline.errors import JobError
from pipeline.neighbors_stage import (
    RATIO_RANK,
    SPACES,
    SearchBatch,
    build_index_task,
    close_pairs,
    count_vectors,
    group_pairs_task,
    group_rows,
    group_stats,
    metric_of,
    rank_rows,
    ratio_pairs_task,
    space_name,
    threshold_median,
    vectors,
)
from pipeline.runner import JobRun, TableSpec, WriteResult
from pipeline.schemas import duplicate_groups_schema, neighbors_schema

log = logging.getLogger("stbatch.neighbors")

JOB = "neighbors"
NEIGHBORS = TableSpec("neighbors", neighbors_schema(), ("space", "image_id", "face_index", "rank"),
                      replace_key=("space", "image_id", "face_index"))
GROUPS = TableSpec("duplicate_groups", duplicate_groups_schema(), ("space", "image_id", "face_index"))
SETTINGS = Settings


def _settings_key(cfg: Settings, name: str) -> str:
    ix = cfg.index
    rule = {"threshold": cfg.threshold} if cfg.threshold is not None else {"ratio": cfg.ratio,
                                                                            "ratio_rank": RATIO_RANK}
    return json.dumps({"space": name, "k": cfg.k, **rule, "kind": ix.kind, "exact_below": ix.exact_below,
                       "nlist": ix.nlist, "nprobe": ix.nprobe}, sort_keys=True)


def run(cfg: Settings, before_commit=None) -> dict:
    """The job body (also callable from Python; `before_commit(run)` is a test hook)."""
    import ray

    if not cfg.input:
        raise JobError("neighbors: set input=URI")
    space, layers, threshold, ratio = cfg.space, cfg.layers, cfg.threshold, cfg.ratio
    output = cfg.output or cfg.input
    name, metric = space_name(space, layers), metric_of(space)
    rule = f"threshold {threshold:g}" if threshold is not None else f"ratio {ratio:g} of the {RATIO_RANK}rd neighbour"
    table = SPACES[space][0]
    src = delta.open_table(cfg.input, table)
    if src is None:
        hint = " (run jobs.embed first)" if space == "identity" else ""
        raise JobError(f"neighbors: no committed {table} table under {cfg.input}{hint}")
    source_version = src.version()
    del src
    s, ix = cfg.search, cfg.index
    r = JobRun(output, JOB, cfg, rows_per_file=s.rows_per_part, log_every_s=s.log_every_s)
    vec = vectors(cfg.input, space, layers).materialize()
    n, dim = count_vectors(vec)
    key = _settings_key(cfg, name)
    if n and recompute.up_to_date(output, NEIGHBORS.name, source_version, key, {"space": name}):
        log.info("neighbors: %s version %d was searched with the same settings: nothing to do", table, source_version)
        return {"run_id": r.run_id, "counts": {"in": n, "ok": 0, "failed": 0, "skipped": n}, "extra": {"space": name}}
    kind = vector_index.choose_kind(n, ix.kind, ix.exact_below)
    log.info("neighbors %s -> %s: %d faces, %d-d %s vectors of %s (%s), %s index, k=%d, %s, run %s",
             cfg.input, output, n, dim, name, table, metric, kind, cfg.k, rule, r.run_id)
    res, gres, stats = WriteResult(), WriteResult(), {"faces": 0, "groups": 0}
    resolved = threshold if threshold is not None else 0.0
    if n >= 2:
        build = ray.remote(build_index_task).options(num_cpus=ix.build_cpus, num_returns=3)
        index_ref, ids_ref, center_ref = build.remote(list(vec.to_arrow_refs()), metric, kind, ix.nlist, ix.nprobe,
                                                      ix.threads)
        check_room_for_tasks(s.concurrency, s.num_cpus, "search")
        rows = vec.map_batches(SearchBatch, batch_size=s.batch_size, batch_format="pyarrow",
                               compute=actor_pool(s.concurrency), num_cpus=s.num_cpus,
                               fn_constructor_kwargs={"index": [index_ref], "ids": [ids_ref],
                                                      "center": [center_ref], "k": cfg.k,
                                                      "metric": metric, "space": name, "run_id": r.run_id,
                                                      "nprobe": ix.nprobe, "threads": ix.threads})
        res = r.write(rows, NEIGHBORS, expected=n)
        del index_ref, ids_ref, center_ref
        root = delta.table_root(output, NEIGHBORS.name)
        fields = [NEIGHBORS.schema.field(c) for c in ("image_id", "face_index", "rank", "neighbor_image_id",
                                                      "neighbor_face_index", "distance")]
        written = delta.read_files([storage.join(root, f.path) for f in res.files], fields)
        thresholds_ref = None
        if threshold is None:
            # the rule needs a face's rows together, which the written files do not keep: every
            # face's first RATIO_RANK rows go to one task (keys and distances only)
            near = written.map_batches(rank_rows, batch_format="pyarrow", fn_kwargs={"upto": RATIO_RANK}).materialize()
            pairs_ref, thresholds_ref = ray.remote(ratio_pairs_task).options(num_returns=2).remote(
                list(near.to_arrow_refs()), ratio)
            pair_refs = [pairs_ref]
            resolved = ray.get(ray.remote(threshold_median).remote(thresholds_ref))
        else:
            pair_refs = list(written.map_batches(close_pairs, batch_format="pyarrow",
                                                 fn_kwargs={"threshold": threshold}).materialize().to_arrow_refs())
        groups_ref = ray.remote(group_pairs_task).remote(pair_refs)
        faces = vec.map_batches(group_rows, batch_format="pyarrow", fn_kwargs={
            "groups": [groups_ref], "space": name, "threshold": threshold, "run_id": r.run_id,
            "thresholds": [thresholds_ref]})
        gres = r.write(faces, GROUPS, expected=n)
        stats = ray.get(ray.remote(group_stats).remote(groups_ref))
    counts = {"in": n, **res.counts}
    seconds = r.seconds()
    rule_meta = {"rule": "threshold", "threshold": str(threshold)} if threshold is not None else {
        "rule": "ratio", "ratio": str(ratio), "ratio_rank": str(RATIO_RANK), "threshold": str(resolved)}
    extra = {"space": name, "metric": metric, "index": kind, "k": cfg.k, "threshold": resolved,
             **({"ratio": ratio} if threshold is None else {}),
             "duplicate_groups": stats["groups"], "faces_in_groups": stats["faces"],
             "faces_per_s": round(n / max(seconds, 1e-9), 3)}
    if before_commit is not None:
        before_commit(r)
    results = {NEIGHBORS: res, GROUPS: gres} if n >= 2 else {}
    r.commit(results, {**counts, "seconds": seconds, **extra},
             extra={"inputs": {"input": cfg.input, "table": table, "version": source_version},
                    "ray": {"version": ray.__version__}},
             metadata={"space": name, **rule_meta, **recompute.inputs_metadata(source_version, key)})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


def check(cfg: Settings) -> list[str]:
    """Before Ray starts: the input root exists."""
    return input_errors("input", cfg.input)


if __name__ == "__main__":
    main(JOB, __doc__, SETTINGS, run, check=check)
