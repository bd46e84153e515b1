"""Arrow schemas of the project's tables, and helpers other tables reuse.

Arrays with a fixed shape (landmarks 5x2, quad 4x2, later w_plus n_latent x 512) are stored
as *nested* FixedSizeLists of float32, e.g. `fixed_size_list(fixed_size_list(float32, 2), 5)`:
pyarrow, pandas and DuckDB read them without this project installed and keep the shape visible
(`landmarks[1]` in DuckDB is the first point, `w_plus[1]` the first layer).

    nested_list_type(pa.float32(), (18, 512))       -> the Arrow type
    nested_list_array(np_array_NxAxB, mask=None)    -> a nested FixedSizeListArray (nulls allowed)
    nested_list_to_numpy(column)                    -> np.ndarray [N, A, B] (nulls -> NaN)
"""
from __future__ import annotations

import datetime as _dt
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from pipeline.status import STATUS_ALIGN_ERROR, STATUS_DECODE_ERROR, STATUS_NO_FACE, STATUS_TOO_LARGE, STATUS_TOO_SMALL

# ---------------------------------------------------------------------------------------------
# Generic helpers


def nested_list_type(value_type: pa.DataType, shape: Sequence[int]) -> pa.DataType:
    """`fixed_size_list` nested once per dimension: shape (5, 2) -> list<list<v, 2>, 5>."""
    t = value_type
    for n in reversed(tuple(shape)):
        t = pa.list_(t, int(n))
    return t


FLOAT32 = pa.float32()


def nested_list_array(arr, value_type: pa.DataType = FLOAT32, mask=None,
                      shape: Sequence[int] | None = None) -> pa.Array:
    """A nested FixedSizeListArray from a numpy array [N, *shape].

    `mask` (bool [N], True = null) marks missing rows; their values are ignored. With N == 0
    pass `shape` (the per-row shape) so the type is still right."""
    np_dtype = value_type.to_pandas_dtype()
    a = np.asarray(arr, dtype=np_dtype)
    if shape is not None:
        a = a.reshape((-1, *shape))
    if a.ndim < 2:
        raise ValueError(f"expected an array [N, ...], got shape {a.shape}")
    n, inner = a.shape[0], a.shape[1:]
    if mask is not None:
        mask = np.asarray(mask, dtype=bool).reshape(n)
        a = np.where(mask.reshape((n,) + (1,) * len(inner)), np.zeros((), dtype=np_dtype), a)
    out: pa.Array = pa.array(np.ascontiguousarray(a).reshape(-1), type=value_type)
    for i, size in enumerate(reversed(inner)):
        outermost = i == len(inner) - 1
        if outermost and mask is not None:
            out = pa.FixedSizeListArray.from_arrays(out, int(size), mask=pa.array(mask, type=pa.bool_()))
        else:
            out = pa.FixedSizeListArray.from_arrays(out, int(size))
    return out


def unsliced(t: pa.Table) -> pa.Table:
    """`t` with fresh buffers when it is a slice holding fixed-size-list columns (W+ codes,
    quads, landmarks). pyarrow 26's filter and take return wrong values for a sliced nested
    fixed-size list (the values of other rows, or garbage), and Ray Data hands map functions
    slices of its blocks: every function that filters or takes rows of such a batch calls this
    first (an IPC round trip copies only the sliced part)."""
    def sliced(col: pa.ChunkedArray) -> bool:
        return pa.types.is_fixed_size_list(col.type) and any(c.offset for c in col.chunks)

    if not any(sliced(c) for c in t.columns):
        return t
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return pa.ipc.open_stream(sink.getvalue()).read_all()


def _list_shape(t: pa.DataType) -> tuple[tuple[int, ...], pa.DataType]:
    shape = []
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    return tuple(shape), t


def _dense(x) -> np.ndarray:
    if isinstance(x, np.ndarray) and x.dtype != object:
        return x
    if isinstance(x, (np.ndarray, list, tuple)):
        return np.stack([_dense(e) for e in x])
    return np.asarray(x)


def nested_list_to_numpy(column, dtype=np.float32) -> np.ndarray:
    """A nested FixedSizeList column (or plain / large lists of equal lengths, as Delta returns
    them) back to numpy [N, *shape]; null rows come back as NaN.

    Accepts a pyarrow Array / ChunkedArray, or what Ray's `batch_format="numpy"` makes of such a
    column (an object array of object arrays, None for null rows), or a dense ndarray."""
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        return _arrow_nested_to_numpy(column, dtype)
    if isinstance(column, np.ndarray) and column.dtype != object:
        return column.astype(dtype, copy=False)
    rows = list(column)
    present = [i for i, r in enumerate(rows) if r is not None]
    if not present:
        return np.full((len(rows), 0), np.nan, dtype=dtype)
    dense = _dense([rows[i] for i in present]).astype(dtype, copy=False)
    if len(present) == len(rows):
        return dense
    out = np.full((len(rows), *dense.shape[1:]), np.nan, dtype=dtype)
    out[present] = dense
    return out


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)


def _variable_nested_to_numpy(column: pa.Array, dtype=np.float32) -> np.ndarray:
    """Plain / large lists (what Delta stores a fixed-size list as): the per-row shape comes from
    the list lengths, which must be the same in every non-null row."""
    import pyarrow.compute as pc

    n = len(column)
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    flat = column if valid.all() else column.filter(pa.array(valid))
    m = len(flat)
    shape: list[int] = []
    while _is_list(flat.type):
        if pa.types.is_fixed_size_list(flat.type):
            size = flat.type.list_size
        else:
            lengths = pc.unique(pc.fill_null(pc.list_value_length(flat), -1)).to_pylist()
            if len(lengths) > 1 or (lengths and lengths[0] < 0):
                raise ValueError(f"nested list rows of different lengths {sorted(lengths)[:5]}: not an array")
            size = lengths[0] if lengths else 0
        shape.append(int(size))
        flat = flat.flatten()
    if not m:
        return np.full((n, 0), np.nan, dtype=dtype)
    dense = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=dtype).reshape((m, *shape))
    if m == n:
        return dense
    out = np.full((n, *shape), np.nan, dtype=dtype)
    out[valid] = dense
    return out


def _arrow_nested_to_numpy(column, dtype=np.float32) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    t = column.type
    while pa.types.is_fixed_size_list(t):
        t = t.value_type
    if _is_list(t):
        return _variable_nested_to_numpy(column, dtype)
    shape, _ = _list_shape(column.type)
    n = len(column)
    if n == 0:
        return np.zeros((0, *shape), dtype=dtype)
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    filled = column if valid.all() else column.fill_null(
        pa.scalar(np.zeros(shape, dtype=dtype).tolist(), type=column.type))
    flat = filled
    for _ in shape:
        flat = flat.flatten()
    out = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=dtype).reshape((n, *shape))
    if not valid.all():
        out = out.copy()
        if np.issubdtype(out.dtype, np.floating):
            out[~valid] = np.nan
    return out


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


# ---------------------------------------------------------------------------------------------
# The `faces` table

# Failure statuses of the faces table (one row per input file, error text says why): pipeline.status
FACE_STATUSES_FAILED = (STATUS_DECODE_ERROR, STATUS_TOO_LARGE, STATUS_TOO_SMALL, STATUS_NO_FACE, STATUS_ALIGN_ERROR)

LANDMARKS_TYPE = nested_list_type(pa.float32(), (5, 2))
QUAD_TYPE = nested_list_type(pa.float32(), (4, 2))
BBOX_TYPE = nested_list_type(pa.float32(), (4,))

FACES_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),   # hex sha256 of the source bytes
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("n_faces", pa.int32()),                     # faces detected above min_score
    pa.field("face_index", pa.int32()),                  # rank by box area (0 = largest); null if none
    pa.field("det_score", pa.float32()),
    pa.field("bbox", BBOX_TYPE),                         # x0, y0, x1, y1 in source pixels
    pa.field("landmarks", LANDMARKS_TYPE),               # eye l, eye r, nose, mouth l, mouth r (x, y)
    pa.field("quad", QUAD_TYPE),                         # FFHQ quad: top-left, bottom-left, bottom-right, top-right
    pa.field("aligned_uri", pa.string()),
    pa.field("width", pa.int32()),                       # source size after EXIF orientation
    pa.field("height", pa.int32()),
    # the source file as listed when it was read: a nightly align knows it by these, unread
    pa.field("source_size", pa.int64()),
    pa.field("source_etag", pa.string()),                # ETag, or "mtime:..." (pipeline.storage.version_tag)
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
], metadata={b"table": b"faces", b"version": b"1"})
SOURCE_LISTING_COLUMNS = ("source_size", "source_etag")


def faces_table(rows: Iterable[dict], run_id: str, created_at: _dt.datetime | None = None) -> pa.Table:
    """Build a `faces` table from row dicts (missing keys -> null; arrays as numpy)."""
    rows = list(rows)
    n = len(rows)
    created_at = created_at or utc_now()

    def col(name, default=None):
        return [r.get(name, default) for r in rows]

    def fixed(name, shape):
        vals = col(name)
        mask = np.array([v is None for v in vals], dtype=bool)
        arr = np.zeros((n, *shape), dtype=np.float32)
        for i, v in enumerate(vals):
            if v is not None:
                arr[i] = np.asarray(v, dtype=np.float32).reshape(shape)
        return nested_list_array(arr, pa.float32(), mask=mask if mask.any() else None, shape=shape)

    arrays = {
        "image_id": pa.array(col("image_id"), pa.string()),
        "source_uri": pa.array(col("source_uri"), pa.string()),
        "status": pa.array(col("status"), pa.string()),
        "error": pa.array(col("error"), pa.string()),
        "n_faces": pa.array(col("n_faces"), pa.int32()),
        "face_index": pa.array(col("face_index"), pa.int32()),
        "det_score": pa.array(col("det_score"), pa.float32()),
        "bbox": fixed("bbox", (4,)),
        "landmarks": fixed("landmarks", (5, 2)),
        "quad": fixed("quad", (4, 2)),
        "aligned_uri": pa.array(col("aligned_uri"), pa.string()),
        "width": pa.array(col("width"), pa.int32()),
        "height": pa.array(col("height"), pa.int32()),
        "source_size": pa.array(col("source_size"), pa.int64()),
        "source_etag": pa.array(col("source_etag"), pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "created_at": pa.array([created_at] * n, pa.timestamp("us", tz="UTC")),
    }
    return pa.Table.from_arrays([arrays[f.name] for f in FACES_SCHEMA], schema=FACES_SCHEMA)


# ---------------------------------------------------------------------------------------------
# The `latents` table

METRIC_COLUMNS = ("psnr", "mse", "lpips", "id_similarity")
# Paste-back (pipeline.paste_stage), in the latents and edits tables; null without paste_back.
COMPOSITE_FIELDS = (
    pa.field("composite_uri", pa.string()),     # the whole photo with this face pasted back
    pa.field("psnr_outside", pa.float32()),     # composite vs photo outside the face masks: inf = untouched
    pa.field("psnr_box", pa.float32()),         # composite vs photo inside the face quad's bounding box
)


def latents_schema(n_latent: int, style_dim: int) -> pa.Schema:
    """`w_plus` as a nested FixedSizeList [n_latent][style_dim] of float32: pyarrow, pandas and
    DuckDB read it without this project (`w_plus[1]` = layer 1 in DuckDB)."""
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("face_index", pa.int32(), nullable=False),
        pa.field("source_uri", pa.string()),
        pa.field("aligned_uri", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("w_plus", nested_list_type(pa.float32(), (n_latent, style_dim))),
        pa.field("model", pa.string()),
        pa.field("checkpoint_sha256", pa.string()),
        # reconstruction metrics (null unless the run computed them)
        pa.field("psnr", pa.float32()),
        pa.field("mse", pa.float32()),
        pa.field("lpips", pa.float32()),
        pa.field("id_similarity", pa.float32()),
        pa.field("metric_backbones", pa.string()),  # labels: says "RANDOM-INIT" for test backbones
        pa.field("reconstruction_uri", pa.string()),
        *COMPOSITE_FIELDS,                          # paste_back=true: the reconstruction in its photo
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ], metadata={b"table": b"latents", b"version": b"1",
                 b"w_plus_shape": f"{n_latent},{style_dim}".encode()})


def metrics_schema() -> pa.Schema:
    """Per-face reconstruction metrics of `jobs.evaluate` (the run summary is in its manifest)."""
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("face_index", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("psnr", pa.float32()),
        pa.field("mse", pa.float32()),
        pa.field("lpips", pa.float32()),
        pa.field("id_similarity", pa.float32()),
        pa.field("metric_backbones", pa.string()),
        pa.field("reconstruction_uri", pa.string()),
        pa.field("aligned_uri", pa.string()),
        pa.field("latents_run_id", pa.string()),
        pa.field("model", pa.string()),
        pa.field("checkpoint_sha256", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ], metadata={b"table": b"metrics", b"version": b"1"})


def make_table(cols: dict, schema: pa.Schema, run_id: str, w_plus: np.ndarray | None = None,
               ok: np.ndarray | None = None, created_at: _dt.datetime | None = None) -> pa.Table:
    """Build a table of `schema`: `cols` maps column names to per-row lists/arrays (missing ->
    null, NaN floats -> null); `w_plus` [N, n_latent, D] fills the `w_plus` column, with rows
    where `ok` is False stored as null."""
    n = len(next(iter(cols.values())))
    created_at = created_at or utc_now()
    arrays = []
    for f in schema:
        if f.name == "w_plus":
            if w_plus is None:
                raise ValueError("make_table: a schema with w_plus needs the w_plus array")
            mask = ~np.asarray(ok, dtype=bool)
            arrays.append(nested_list_array(w_plus, pa.float32(), mask=mask if mask.any() else None,
                                            shape=tuple(w_plus.shape[1:])).cast(f.type))
        elif f.name == "run_id":
            arrays.append(pa.array([run_id] * n, pa.string()))
        elif f.name == "created_at":
            arrays.append(pa.array([created_at] * n, f.type))
        elif f.name in cols:
            v = cols[f.name]
            arrays.append(pa.array(list(v) if not isinstance(v, np.ndarray) else v, f.type, from_pandas=True))
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


# ---------------------------------------------------------------------------------------------
# The `edits` table (jobs.edit) and the `classifier_eval` table (jobs.fit_classifier)

EDIT_KINDS = ("label", "reference", "direction")


def edits_schema() -> pa.Schema:
    """One row per edit request. `edit_id` = sha256 of the request's canonical fields, so a
    rerun finds what is done and the image key never comes from a user-supplied name."""
    return pa.schema([
        pa.field("edit_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),
        pa.field("face_index", pa.int32()),
        pa.field("kind", pa.string()),                 # label | reference | direction
        pa.field("attribute", pa.string()),
        pa.field("strength", pa.float32()),
        pa.field("target", pa.int8()),                 # label edits: 1 add, 0 remove
        pa.field("reference_image_id", pa.string()),
        pa.field("reference_face_index", pa.int32()),
        pa.field("direction_uri", pa.string()),
        pa.field("order", pa.int8()),                  # label edits: 1 or 2
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("output_uri", pa.string()),           # the edited image (PNG)
        pa.field("source_reconstruction_uri", pa.string()),
        *COMPOSITE_FIELDS,                             # paste_back=true: the edit in its photo
        pa.field("id_similarity", pa.float32()),       # edited vs source reconstruction
        pa.field("lpips", pa.float32()),               # edited vs source reconstruction
        pa.field("logit_before", pa.float32()),        # classifier logit of `attribute`
        pa.field("logit_after", pa.float32()),
        pa.field("metric_backbones", pa.string()),
        pa.field("model", pa.string()),
        pa.field("checkpoint_sha256", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ], metadata={b"table": b"edits", b"version": b"1"})


def classifier_eval_schema() -> pa.Schema:
    """Held-out quality of a trained latent classifier, one row per attribute."""
    return pa.schema([
        pa.field("attribute", pa.string(), nullable=False),
        pa.field("attribute_index", pa.int32(), nullable=False),
        pa.field("n_train", pa.int64()),                # training rows with a label for it
        pa.field("n_val", pa.int64()),                  # held-out rows with a label for it
        pa.field("accuracy", pa.float64()),             # threshold: logit > 0
        pa.field("auc", pa.float64()),                  # ROC AUC (null when one class only)
        pa.field("positive_rate", pa.float64()),        # share of positives among held-out labels
        pa.field("predicted_positive_rate", pa.float64()),
        pa.field("classifier_uri", pa.string()),
        pa.field("classifier_sha256", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ], metadata={b"table": b"classifier_eval", b"version": b"1"})


# ---------------------------------------------------------------------------------------------
# Analytics tables (jobs.score, jobs.embed, jobs.neighbors, jobs.quality)

EMBEDDING_DIM = 512   # facenet-pytorch InceptionResnetV1


def scores_schema(columns: Sequence[str]) -> pa.Schema:
    """`scores`: one probability (sigmoid of the classifier's logit) per attribute column, with
    the classifier that gave it; `columns` are the attributes' safe column names."""
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("face_index", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("classifier_sha256", pa.string(), nullable=False),
        pa.field("classifier_run_id", pa.string()),     # the fit run that published it (null: a file)
        pa.field("latents_run_id", pa.string()),
        *[pa.field(c, pa.float32()) for c in columns],
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ], metadata={b"table": b"scores", b"version": b"1"})


def embeddings_schema(dim: int = EMBEDDING_DIM) -> pa.Schema:
    """`embeddings`: the identity vector of each aligned crop (L2-normalised, as FaceNet gives it)."""
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("face_index", pa.int32(), nullable=False),
        pa.field("aligned_uri", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("embedding", nested_list_type(pa.float32(), (dim,))),
        pa.field("backbone", pa.string(), nullable=False),  # says "RANDOM-INIT" for test backbones
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ], metadata={b"table": b"embeddings", b"version": b"1"})


def neighbors_schema() -> pa.Schema:
    """`neighbors`: the k nearest faces of every face in a space, rank 1 = nearest."""
    return pa.schema([
        pa.field("space", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("face_index", pa.int32(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("neighbor_image_id", pa.string(), nullable=False),
        pa.field("neighbor_face_index", pa.int32(), nullable=False),
        pa.field("distance", pa.float32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ], metadata={b"table": b"neighbors", b"version": b"1"})


def duplicate_groups_schema() -> pa.Schema:
    """`duplicate_groups`: every face of the space with its group (connected component of the
    near-duplicate pairs); group_size 1 = no near-duplicate; threshold: the face's resolved
    absolute threshold (the job's, or the ratio rule's for this face)."""
    return pa.schema([
        pa.field("space", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("face_index", pa.int32(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),   # the representative's image_id:face_index
        pa.field("group_size", pa.int32(), nullable=False),
        pa.field("representative_image_id", pa.string(), nullable=False),
        pa.field("representative_face_index", pa.int32(), nullable=False),
        pa.field("threshold", pa.float32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ], metadata={b"table": b"duplicate_groups", b"version": b"1"})


def quality_schema() -> pa.Schema:
    """`quality`: how atypical each face's code is and how bad its reconstruction, against the
    dataset (pipeline.quality_stage)."""
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("face_index", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("mahalanobis", pa.float32()),    # of the mean-over-layers code, shrunk covariance
        pa.field("psnr", pa.float32()),           # from the latents row (null without metrics)
        pa.field("lpips", pa.float32()),
        pa.field("psnr_z", pa.float32()),         # (mean - psnr) / std: high = worse than usual
        pa.field("lpips_z", pa.float32()),        # (lpips - mean) / std: high = worse than usual
        pa.field("latents_run_id", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ], metadata={b"table": b"quality", b"version": b"1"})
