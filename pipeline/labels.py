"""Attribute labels of the classifier fit: the user's table (CSV / Parquet, user-sized, read
once in the driver) normalised into one Arrow table, and its map-side join with the latents
rows in Ray tasks.

    lab = load_labels(uri, attributes_list)          # Labels: names, join_on, Arrow table
    ref = lab.broadcast()                             # one object-store copy, tasks read it
    train = latents.map_batches(labelled_codes_batch, fn_kwargs={"labels_refs": ref, ...})

The label table holds one row per join key: `_key` (image_id, `image_id\\x1fface_index`, or a
file's base name), `labels` float32 [K] (NaN = missing) and `label_error` (a value that is not
0/1/-1/bool). A later row of the same key wins. The codes never come to the driver; neither
does a per-code dict: workers look their keys up in the broadcast table with Arrow.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import delta
from pipeline.errors import JobError
from pipeline.fit_data import codes_or_empty, is_val, read_table_uri
from pipeline.schemas import unsliced
from pipeline.status import STATUS_OK

log = logging.getLogger("stbatch.fit")

KEY_COLUMNS = ("image_id", "face_index", "file", "filename")
JOIN_ON = ("image_face", "image_id", "file")
SEP = "\x1f"
NO_LABELS = "no labels"


@dataclass
class Labels:
    names: list[str]
    join_on: str          # image_face | image_id | file
    table: pa.Table       # _key, labels [K] float32, label_error

    def broadcast(self) -> list:
        import ray

        return [ray.put(self.table)]


# ---------------------------------------------------------------------------- the user's table

def label_value(v) -> float | None:
    """1/True -> 1, 0/-1/False -> 0 (CelebA writes -1 for 'no'), null/NaN -> NaN (missing);
    anything else -> None (invalid)."""
    if v is None:
        return math.nan
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("", "nan", "null", "none"):
            return math.nan
        if s in ("true", "yes"):
            return 1.0
        if s in ("false", "no"):
            return 0.0
        try:
            v = float(s)
        except ValueError:
            return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if math.isnan(f):
        return math.nan
    if f == 1.0:
        return 1.0
    if f in (0.0, -1.0):
        return 0.0
    return None


def attribute_columns(table: pa.Table, attributes_list: list[str] | None = None) -> list[str]:
    """The attribute names: `attributes_list` when given (each must be a column), else every
    numeric/bool column other than the keys, in CelebA's order when they are all CelebA names."""
    from stmodel.classifier import CELEBA_ATTRIBUTES

    if attributes_list:
        names = list(attributes_list)
        missing = [a for a in names if a not in table.column_names]
        if missing:
            raise JobError(f"attributes table has no column(s) {missing}; it has {table.column_names}")
        return names
    names = []
    for f in table.schema:
        if f.name in KEY_COLUMNS:
            continue
        t = f.type
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            names.append(f.name)
        else:
            log.warning("attributes table: column %s (%s) is not numeric, ignored", f.name, t)
    if not names:
        raise JobError(f"attributes table has no numeric attribute columns: {table.column_names}")
    if set(names) <= set(CELEBA_ATTRIBUTES):
        names = [a for a in CELEBA_ATTRIBUTES if a in names]
    return names


def _user_keys(t: pa.Table) -> tuple[str, pa.Array]:
    if "image_id" in t.column_names:
        ids = pc.cast(t["image_id"], pa.string())
        if "face_index" in t.column_names:
            face = pc.cast(pc.fill_null(pc.cast(t["face_index"], pa.int64()), 0), pa.string())
            return "image_face", pc.binary_join_element_wise(ids, face, SEP)
        return "image_id", ids
    if "file" in t.column_names or "filename" in t.column_names:
        col = pc.cast(t["file" if "file" in t.column_names else "filename"], pa.string())
        return "file", base_names(col)
    raise JobError(f"attributes table needs an image_id column (or file/filename); it has {t.column_names}")


def base_names(col) -> pa.Array:
    """The last path component of each URI (null stays null)."""
    return pc.replace_substring_regex(col, pattern=r"^.*/", replacement="")


def load_labels(uri: str, attributes_list: list[str] | None = None) -> Labels:
    """Read and normalise the user's attribute table (one pass over its cells)."""
    t = read_table_uri(uri, string_columns=("image_id", "file", "filename"))
    names = attribute_columns(t, attributes_list)
    join_on, keys = _user_keys(t)
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    values = np.full((t.num_rows, len(names)), np.nan, np.float32)
    invalid: list[list[str] | None] = [None] * t.num_rows  # per row: its attributes with an invalid value
    for k, name in enumerate(names):
        for i, v in enumerate(t[name].to_pylist()):
            f = label_value(v)
            if f is None:
                bad = invalid[i]
                if bad is None:
                    bad = invalid[i] = []
                bad.append(name)
            else:
                values[i, k] = f
    error = [None if e is None else f"invalid label value (not 0/1/-1/bool) in {', '.join(e[:5])}" for e in invalid]
    flat = pa.array(values.reshape(-1), pa.float32())
    table = pa.table({"_key": keys, "labels": pa.FixedSizeListArray.from_arrays(flat, len(names)),
                      "label_error": pa.array(error, pa.string())})
    table = table.filter(pc.is_valid(table["_key"]))
    table = _last_per_key(table)
    return Labels(names, join_on, table)


def _last_per_key(t: pa.Table) -> pa.Table:
    """One row per `_key`, the last one of the user's table."""
    if not t.num_rows:
        return t
    idx = pa.table({"_key": t["_key"], "_i": pa.array(np.arange(t.num_rows))})
    last = idx.group_by("_key").aggregate([("_i", "max")])["_i_max"].to_numpy()
    return t.take(pa.array(np.sort(last)))


# ---------------------------------------------------------------------------- the join, in Ray tasks

def latent_join_keys(batch: pa.Table, join_on: str) -> pa.Array:
    if join_on == "image_face":
        face = pc.cast(pc.cast(batch["face_index"], pa.int64()), pa.string())
        return pc.binary_join_element_wise(pc.cast(batch["image_id"], pa.string()), face, SEP)
    if join_on == "file":
        return base_names(pc.cast(batch["source_uri"], pa.string()))
    return pc.cast(batch["image_id"], pa.string())


def _lookup(batch: pa.Table, labels_refs: list, join_on: str):
    """(label table, index into it per row or null)."""
    lab = delta.gather(labels_refs)
    if lab is None:
        lab = pa.table({"_key": pa.array([], pa.string())})
    keys = latent_join_keys(batch, join_on)
    return lab, pc.index_in(keys, value_set=lab["_key"])


def _usable(lab: pa.Table, idx: pa.Array, ok: np.ndarray) -> tuple[np.ndarray, list]:
    """Rows (ok codes) with a usable label row, and the reason for every ok row without one."""
    hit = np.asarray(idx.is_valid().to_numpy(zero_copy_only=False), bool) & ok
    reason: list = [None] * len(ok)
    if not len(lab.column_names) > 1:
        return np.zeros(len(ok), bool), [NO_LABELS if o else None for o in ok]
    rows = np.asarray(pc.fill_null(idx, 0).to_numpy(zero_copy_only=False), np.int64)
    err = lab["label_error"].take(pa.array(rows)).to_pylist() if len(rows) else []
    vals = codes_labels(lab, rows)
    usable = np.zeros(len(ok), bool)
    for i in range(len(ok)):
        if not ok[i]:
            continue
        if not hit[i]:
            reason[i] = NO_LABELS
        elif err[i]:
            reason[i] = err[i]
        elif np.isnan(vals[i]).all():
            reason[i] = NO_LABELS
        else:
            usable[i] = True
    return usable, reason


def codes_labels(lab: pa.Table, rows: np.ndarray) -> np.ndarray:
    col = lab["labels"].combine_chunks()
    k = col.type.list_size
    if not len(rows):
        return np.zeros((0, k), np.float32)
    taken = col.take(pa.array(rows))
    return np.asarray(taken.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(rows), k)


def labelled_codes_batch(batch: pa.Table, labels_refs: list, join_on: str, val_fraction: float, seed: int,
                         keep: str, shape: tuple[int, int]) -> dict:
    """latents rows -> `{"w_plus" [B, n, D], "labels" [B, K]}`: ok codes with a usable label row
    whose split is `keep`."""
    lab, idx = _lookup(batch, labels_refs, join_on)
    ok = np.asarray(pc.equal(batch["status"], STATUS_OK).to_numpy(zero_copy_only=False), bool)
    usable, _ = _usable(lab, idx, ok)
    usable &= is_val(batch["image_id"].to_pylist(), val_fraction, seed) == (keep == "val")
    sel = np.flatnonzero(usable)
    t = unsliced(batch.select(["w_plus"])).take(pa.array(sel, pa.int64()))
    rows = np.asarray(pc.fill_null(idx, 0).to_numpy(zero_copy_only=False), np.int64)[sel]
    k = lab["labels"].type.list_size if "labels" in lab.column_names else 0
    y = codes_labels(lab, rows) if k else np.zeros((len(sel), 0), np.float32)
    return {"w_plus": codes_or_empty(t, shape), "labels": y}


def _count_batch(batch: pa.Table, labels_refs: list, join_on: str, val_fraction: float, seed: int) -> pa.Table:
    lab, idx = _lookup(batch, labels_refs, join_on)
    ok = np.asarray(pc.equal(batch["status"], STATUS_OK).to_numpy(zero_copy_only=False), bool)
    usable, reason = _usable(lab, idx, ok)
    val = is_val(batch["image_id"].to_pylist(), val_fraction, seed)
    errors: dict[str, int] = {}
    for r in reason:
        if r is not None:
            errors[r] = errors.get(r, 0) + 1
    rows = np.asarray(pc.fill_null(idx, 0).to_numpy(zero_copy_only=False), np.int64)
    train = usable & ~val
    per_attr = (~np.isnan(codes_labels(lab, rows[train]))).sum(0) if "labels" in lab.column_names else np.zeros(0)
    matched = np.unique(rows[np.asarray(idx.is_valid().to_numpy(zero_copy_only=False), bool)])
    return pa.table({"n_in": [batch.num_rows], "n_ok": [int(usable.sum())], "n_failed": [int((ok & ~usable).sum())],
                     "n_skipped": [int((~ok).sum())], "n_train": [int(train.sum())],
                     "n_val": [int((usable & val).sum())], "errors": [json.dumps(errors)],
                     "per_attr_train": [per_attr.astype(np.int64).tolist()],
                     "matched": [matched.astype(np.int64).tolist()]})


def label_counts(latents, labels: Labels, refs: list, val_fraction: float, seed: int) -> dict:
    """Counts of the join (one record per block to the driver): in / ok / failed / skipped,
    train / val rows, the reasons ok codes were not used, training labels per attribute and
    the label rows that matched no code."""
    out = {"in": 0, "ok": 0, "failed": 0, "skipped": 0, "train": 0, "val": 0}
    errors: dict[str, int] = {}
    per_attr = np.zeros(len(labels.names), np.int64)
    matched = np.zeros(labels.table.num_rows, bool)
    recs = latents.map_batches(_count_batch, batch_format="pyarrow", batch_size=4096,
                               fn_kwargs={"labels_refs": refs, "join_on": labels.join_on,
                                          "val_fraction": float(val_fraction), "seed": int(seed)})
    for rec in recs.iter_rows():
        for k in ("in", "ok", "failed", "skipped", "train", "val"):
            out[k] += int(rec[f"n_{k}"])
        for r, n in json.loads(rec["errors"]).items():
            errors[r] = errors.get(r, 0) + int(n)
        if len(rec["per_attr_train"]):
            per_attr += np.asarray(rec["per_attr_train"], np.int64)
        matched[np.asarray(rec["matched"], np.int64)] = True
    return {**out, "errors": errors, "per_attr_train": per_attr.tolist(),
            "labels_without_latents": int((~matched).sum())}


__all__ = ["Labels", "label_value", "attribute_columns", "load_labels", "latent_join_keys", "labelled_codes_batch",
           "label_counts"]
