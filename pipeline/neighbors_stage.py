"""Ray stages of the neighbors job: vectors of a space from the committed tables, the index built
in one task, the search on an actor pool, and near-duplicate groups by union-find in a task.

    vec = vectors(root, space, layers).materialize()             # tasks; blocks in the object store
    index_ref, ids_ref = build_index.remote(vec refs, ...)        # one task: the index as bytes
    rows = vec.map_batches(SearchBatch, fn_constructor_kwargs={"index": [index_ref], ...})
    pairs = <this run's neighbors files> .map_batches(close_pairs)  # distance < threshold, or
    pairs, thresholds = ratio_pairs.remote(<files> .map_batches(rank_rows) refs)  # the ratio rule
    groups_ref = group_pairs.remote(pair refs)                    # one task: union-find
    faces = vec.map_batches(group_rows, groups=[groups_ref])      # every face with its group

The driver holds object references and file records, never a vector or a row.

Spaces: `crop` (a thumbnail of each face's crop, the `latents` table's `aligned_uri`: CROP_SIDE
px square of its central CROP_KEEP, RGB in [0, 1], so the Euclidean distance / sqrt(dim) is the
RMS pixel difference), `identity` (the `embeddings` table, cosine distance) and `wplus` (the
`latents` table's W+ code averaged over its layers, or over a layer range [a, b), Euclidean
distance).

Near-duplicate pairs: an absolute `threshold` on the distance, or the ratio rule (`ratio_pairs`):
a pair (a, b) among a's first RATIO_RANK - 1 neighbours whose distance is below `ratio` times
the distance from a to its RATIO_RANK-th neighbour and below `ratio` times b's. A copy stands
out against the face's other neighbours whatever the space's scale (an encoder's, pixels'), and
the RATIO_RANK-th neighbour is still a distinct face when a photo has two copies.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import delta, vector_index
from pipeline.fit_data import codes_to_numpy
from pipeline.runner import UNIT_COLUMN
from pipeline.schemas import (
    duplicate_groups_schema,
    make_table,
    neighbors_schema,
    nested_list_array,
    nested_list_to_numpy,
)
from pipeline.status import STATUS_OK

log = logging.getLogger("stbatch.neighbors")

SPACES = {"identity": ("embeddings", "embedding", "cosine"), "wplus": ("latents", "w_plus", "l2"),
          "crop": ("latents", "aligned_uri", "l2")}
KEY = ("image_id", "face_index")
# The crop thumbnail: the central 80 % (a copy cropped by up to 5 % a side still covers it),
# block-averaged to 8 x 8 (JPEG blocks and resampling average out); measured on planted copies
# (README, Analytics)
CROP_KEEP = 0.8
CROP_SIDE = 8
# the ratio rule's reference neighbour: the 3rd, so that a photo with two copies still has a
# distinct face to be compared with
RATIO_RANK = 3


def space_name(space: str, layers: tuple[int, int] | None) -> str:
    """The `space` value of the rows: `identity`, `wplus`, or `wplus[a:b]` for a layer range."""
    return f"{space}[{int(layers[0])}:{int(layers[1])}]" if space == "wplus" and layers else space


def metric_of(space: str) -> str:
    return SPACES[space][2]


def crop_thumbnail(rgb: np.ndarray) -> np.ndarray:
    """The `crop` space's vector of an RGB uint8 image: its central CROP_KEEP, CROP_SIDE px square
    by box averaging, in [0, 1], divided by sqrt(dim) (distances are RMS pixel differences)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    m = (1 - CROP_KEEP) / 2
    im = Image.fromarray(np.ascontiguousarray(rgb[..., :3])).crop(
        (round(w * m), round(h * m), round(w * (1 - m)), round(h * (1 - m))))
    v = np.asarray(im.resize((CROP_SIDE, CROP_SIDE), Image.Resampling.BOX), np.float32).reshape(-1) / 255.0
    return v / np.float32(np.sqrt(v.size))


def _crop_vectors(uris: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnails of the crops at `uris`, and which could be read and decoded (a crop gone since
    the codes were written leaves its face out of the space, logged)."""
    from pipeline import storage
    from pipeline.decode import decode_image

    dim = 3 * CROP_SIDE * CROP_SIDE
    out, ok = np.zeros((len(uris), dim), np.float32), np.zeros(len(uris), bool)
    for i, uri in enumerate(uris):
        try:
            d = decode_image(storage.read_bytes(uri), min_side=1)
        except Exception as e:  # noqa: BLE001 - a missing crop is one face left out, not a failed run
            log.warning("neighbors: crop %s unreadable (%s): face left out of the crop space", uri, e)
            continue
        if d.status != STATUS_OK:
            log.warning("neighbors: crop %s not decoded (%s): face left out of the crop space", uri, d.error)
            continue
        out[i], ok[i] = crop_thumbnail(d.rgb), True
    return out, ok


def _vector_batch(batch: pa.Table, space: str, layers: list[int] | None) -> pa.Table:
    t = batch.filter(pc.equal(batch["status"], STATUS_OK))
    column = SPACES[space][1]
    if space == "crop":
        v, ok = _crop_vectors([str(u) for u in t[column].to_pylist()])
        t, v = t.filter(pa.array(ok)), v[ok]
    elif space == "wplus":
        w = codes_to_numpy(t[column]) if t.num_rows else np.zeros((0, 1, 1), np.float32)
        if layers:
            w = w[:, int(layers[0]):int(layers[1])]
        v = w.mean(axis=1) if t.num_rows else np.zeros((0, 0), np.float32)
    else:
        v = nested_list_to_numpy(t[column]) if t.num_rows else np.zeros((0, 0), np.float32)
    vec = nested_list_array(v, pa.float32(), shape=(v.shape[1],)) if t.num_rows else pa.array(
        [], pa.list_(pa.float32()))
    return pa.table({"image_id": pc.cast(t["image_id"], pa.string()),
                     "face_index": pc.cast(t["face_index"], pa.int32()),
                     "vector": vec})


def vectors(root: str, space: str, layers: tuple[int, int] | None = None):
    """A Ray Dataset (image_id, face_index, vector) of the ok faces of `space` under `root`, or
    None when its table is missing."""
    table, column, _ = SPACES[space]
    ds = delta.read_snapshot(root, table, columns=["image_id", "face_index", "status", column])
    if ds is None:
        return None
    return ds.map_batches(_vector_batch, batch_format="pyarrow", fn_kwargs={"space": space, "layers": layers})


def _count(batch: pa.Table) -> pa.Table:
    dim = 0
    if batch.num_rows:
        dim = int(pc.list_value_length(batch["vector"].combine_chunks()[:1]).to_pylist()[0])
    return pa.table({"n": [batch.num_rows], "dim": [dim]})


def count_vectors(ds) -> tuple[int, int]:
    """(vectors, dimension) of a vectors dataset: one small record per block to the driver."""
    n, dim = 0, 0
    for rec in ds.map_batches(_count, batch_format="pyarrow", batch_size=None).iter_rows():
        n += int(rec["n"])
        dim = max(dim, int(rec["dim"]))
    return n, dim


def _faiss_threads(threads: int) -> None:
    """faiss's OpenMP threads: `threads`, or 0 for every core of the node. Ray sets a task's
    OMP_NUM_THREADS to the CPUs it reserved (1), which would leave the other cores idle while
    the index is built or searched, the run's only heavy work at that point."""
    import os

    import faiss

    faiss.omp_set_num_threads(int(threads) or os.cpu_count() or 1)


def build_index_task(refs: list, metric: str, kind: str, nlist: int | None, nprobe: int, threads: int = 0):
    """Ray task body: the index over every vector of `refs` (blocks of a vectors dataset) as
    serialized bytes, the (image_id, face_index) of each index position, and the center the
    vectors were moved by (vector_index.center_of; None for cosine)."""
    import ray

    tables = [t for t in ray.get(list(refs)) if t.num_rows]
    ids = pa.concat_tables([t.select(list(KEY)) for t in tables])
    _faiss_threads(threads)
    v = np.concatenate([nested_list_to_numpy(t["vector"]) for t in tables])
    del tables
    center = vector_index.center_of(v, metric)
    v = vector_index.prepare(v, metric, center)
    index = vector_index.build(v, metric, kind, nlist=nlist, nprobe=nprobe)
    del v
    return vector_index.serialize(index), ids, center


class SearchBatch:
    """Actor: the index (bytes from the object store) deserialized once; a batch of vectors ->
    its k nearest other faces as `neighbors` rows (rank 1 = nearest). The first row of each face
    carries the face's outcome for the runner's counts (`_unit`)."""

    def __init__(self, index: list, ids: list, center: list, k: int, metric: str, space: str, run_id: str,
                 nprobe: int | None = None, threads: int = 0):
        import ray

        _faiss_threads(threads)
        self.index = vector_index.deserialize(ray.get(index[0]), nprobe=nprobe)
        t = ray.get(ids[0])
        self.center = ray.get(center[0])
        self.keys = np.asarray(delta.key_strings(t, list(KEY)).to_numpy(zero_copy_only=False), dtype=object)
        self.ids = np.asarray(t["image_id"].to_numpy(zero_copy_only=False), dtype=object)
        self.faces = np.asarray(t["face_index"].to_numpy(zero_copy_only=False), dtype=np.int32)
        self.k, self.metric, self.space, self.run_id, self.threads = int(k), metric, space, run_id, int(threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        # OpenMP's thread count is per calling thread, and Ray Data calls this on another thread
        # than the one that ran __init__
        _faiss_threads(self.threads)
        q = vector_index.prepare(nested_list_to_numpy(batch["vector"]), self.metric, self.center)
        dist, pos = vector_index.search(self.index, q, self.k + 1, self.metric)
        mine = np.asarray(delta.key_strings(batch, list(KEY)).to_numpy(zero_copy_only=False), dtype=object)
        # a face is not its own neighbour; keep the first k others of each row
        keep = (pos >= 0) & (self.keys[np.maximum(pos, 0)] != mine[:, None])
        rank = np.cumsum(keep, axis=1)
        keep &= rank <= self.k
        qi, col = np.nonzero(keep)
        pi = pos[qi, col]
        n = len(qi)
        cols = {"space": np.full(n, self.space, dtype=object),
                "image_id": np.asarray(batch["image_id"].to_numpy(zero_copy_only=False), dtype=object)[qi],
                "face_index": np.asarray(batch["face_index"].to_numpy(zero_copy_only=False), np.int32)[qi],
                "rank": rank[qi, col].astype(np.int32),
                "neighbor_image_id": self.ids[pi], "neighbor_face_index": self.faces[pi],
                "distance": dist[qi, col], "status": np.full(n, STATUS_OK, dtype=object)}
        t = make_table(cols, neighbors_schema(), self.run_id)
        first = pc.equal(t["rank"], 1)
        return t.append_column(UNIT_COLUMN, pc.if_else(first, pa.scalar(STATUS_OK), pa.scalar(None, pa.string())))


def close_pairs(batch: pa.Table, threshold: float) -> pa.Table:
    """Neighbour rows -> the pairs (a, b) closer than `threshold` (keys as strings)."""
    t = batch.filter(pc.less(batch["distance"], pa.scalar(float(threshold), pa.float32())))
    a = delta.key_strings(t.select(list(KEY)), list(KEY))
    b = delta.key_strings(t.select(["neighbor_image_id", "neighbor_face_index"]).rename_columns(list(KEY)), list(KEY))
    return pa.table({"a": a, "b": b})


def rank_rows(batch: pa.Table, upto: int) -> pa.Table:
    """Neighbour rows -> those of rank <= `upto` as (a, b, rank, distance), keys as strings."""
    t = batch.filter(pc.less_equal(batch["rank"], pa.scalar(int(upto), pa.int32())))
    a = delta.key_strings(t.select(list(KEY)), list(KEY))
    b = delta.key_strings(t.select(["neighbor_image_id", "neighbor_face_index"]).rename_columns(list(KEY)), list(KEY))
    return pa.table({"a": a, "b": b, "rank": t["rank"], "distance": t["distance"]})


def ratio_pairs_task(refs: list, ratio: float, rank: int = RATIO_RANK) -> tuple[pa.Table, pa.Table]:
    """Ray task body (num_returns=2): the ratio rule over every face's first `rank` neighbours
    (`rank_rows` blocks) -> the pairs (a, b) closer than `ratio` times the distance from a to its
    `rank`-th neighbour and `ratio` times b's, and each face's resolved threshold (key,
    threshold = ratio x that distance). A face with fewer other faces than `rank` is measured
    against its farthest one."""
    import ray

    parts = [t for t in ray.get(list(refs)) if t.num_rows]
    if not parts:
        empty = pa.table({"a": pa.array([], pa.string()), "b": pa.array([], pa.string())})
        return empty, pa.table({"key": pa.array([], pa.string()), "threshold": pa.array([], pa.float32())})
    t = pa.concat_tables(parts)
    keys, inv = np.unique(t["a"].to_numpy(zero_copy_only=False).astype(object), return_inverse=True)
    r = t["rank"].to_numpy()
    d = t["distance"].to_numpy().astype(np.float64)
    # each face's reference distance: its row of the highest rank <= `rank`
    order = np.lexsort((r, inv))
    last = order[np.r_[inv[order][1:] != inv[order][:-1], True]]
    scale = np.zeros(len(keys))
    scale[inv[last]] = d[last]
    limit = float(ratio) * scale
    at_b = pc.index_in(t["b"], value_set=pa.array(keys.tolist(), pa.string()))
    has_b = pc.is_valid(at_b).to_numpy(zero_copy_only=False)
    limit_b = np.where(has_b, limit[pc.fill_null(at_b, 0).to_numpy(zero_copy_only=False)], -1.0)
    close = (r < int(rank)) & (d < limit[inv]) & (d < limit_b)
    a = t["a"].filter(pa.array(close))
    b = t["b"].filter(pa.array(close))
    pairs = pa.table({"a": a, "b": b})
    return pairs, pa.table({"key": pa.array(keys.tolist(), pa.string()),
                            "threshold": pa.array(limit.astype(np.float32))})


def group_pairs_task(refs: list) -> pa.Table:
    """Ray task body: connected components of the pairs (union-find with path halving) ->
    (key, group_id, group_size) of every face in a pair. The representative, whose key is the
    group_id, is the group's smallest key, so a rerun over the same pairs names the same groups."""
    import ray

    parts = [t for t in ray.get(list(refs)) if t.num_rows]
    if not parts:
        return pa.table({"key": pa.array([], pa.string()), "group_id": pa.array([], pa.string()),
                         "group_size": pa.array([], pa.int32())})
    pairs = pa.concat_tables(parts)
    keys, inv = np.unique(np.concatenate([pairs["a"].to_numpy(zero_copy_only=False),
                                          pairs["b"].to_numpy(zero_copy_only=False)]).astype(object),
                          return_inverse=True)
    m = pairs.num_rows
    a, b = inv[:m], inv[m:]
    parent = np.arange(len(keys))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = find(x), find(y)
        if rx != ry:  # the smaller index (np.unique sorts keys) becomes the root: the smallest key
            parent[max(rx, ry)] = min(rx, ry)
    roots = np.array([find(x) for x in range(len(keys))])
    sizes = np.bincount(roots, minlength=len(keys))
    return pa.table({"key": pa.array(keys.tolist(), pa.string()),
                     "group_id": pa.array(keys[roots].tolist(), pa.string()),
                     "group_size": pa.array(sizes[roots].astype(np.int32))})


def threshold_median(thresholds: pa.Table) -> float:
    """The median of the faces' resolved thresholds (ratio_pairs_task's table): the commit's
    one-number summary of the ratio rule."""
    return float(np.median(thresholds["threshold"].to_numpy())) if thresholds.num_rows else 0.0


def group_stats(groups: pa.Table) -> dict:
    """Faces in a near-duplicate group, and groups (of the union-find's table)."""
    return {"faces": groups.num_rows, "groups": len(pc.unique(groups["group_id"]))}


def group_rows(batch: pa.Table, groups: list, space: str, threshold: float | None, run_id: str,
               thresholds: list | None = None) -> pa.Table:
    """Every face of a vectors batch -> its `duplicate_groups` row (a face in no pair is a group
    of one, itself its representative). `threshold`: the absolute one, or None with
    `thresholds` ([ref of ratio_pairs_task's (key, threshold) table]): each face's own."""
    import ray

    g = ray.get(groups[0])
    keys = delta.key_strings(batch.select(list(KEY)), list(KEY))
    if threshold is None:
        if thresholds is None:
            raise ValueError("group_rows: the ratio rule (threshold None) needs the per-face thresholds")
        th = ray.get(thresholds[0])
        at = pc.index_in(keys, value_set=th["key"])
        # a face without neighbour rows (a space of one face) compared with nothing: 0
        per_face = pc.fill_null(pc.take(th["threshold"], pc.fill_null(at, 0)) if th.num_rows else
                                pa.nulls(len(keys), pa.float32()), pa.scalar(0.0, pa.float32()))
        per_face = pc.if_else(pc.is_valid(at), per_face, pa.scalar(0.0, pa.float32())).to_pylist()
    else:
        per_face = [float(threshold)] * batch.num_rows
    pos = pc.index_in(keys, value_set=g["key"])
    found = pc.is_valid(pos)
    gid = pc.if_else(found, pc.take(g["group_id"], pc.fill_null(pos, 0)) if g.num_rows else keys, keys)
    size = pc.if_else(found, pc.take(g["group_size"], pc.fill_null(pos, 0)) if g.num_rows else
                      pa.nulls(len(keys), pa.int32()), pa.scalar(1, pa.int32()))
    rep = pc.split_pattern(gid, "\x1f")
    n = batch.num_rows
    cols = {"space": [space] * n, "image_id": batch["image_id"].to_pylist(),
            "face_index": batch["face_index"].to_pylist(),
            "group_id": [s.replace("\x1f", ":") for s in gid.to_pylist()], "group_size": size.to_pylist(),
            "representative_image_id": [r[0] for r in rep.to_pylist()],
            "representative_face_index": [int(r[1]) for r in rep.to_pylist()],
            "threshold": per_face, "status": [STATUS_OK] * n}
    return make_table(cols, duplicate_groups_schema(), run_id)
