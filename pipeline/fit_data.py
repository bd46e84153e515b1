"""Reading the tables the editing jobs learn from and edit: the committed `latents` snapshot as
a Ray Dataset, the deterministic held-out split, W+ codes as numpy, user tables, and codes
sampled through the inversion model's mapping network.

Nothing here brings the codes to the driver: `read_latents` is a Ray Dataset of the committed
Delta snapshot, the batch functions run in Ray tasks, and `latent_counts` returns one small
record per block. Rows are keyed `<image_id>:<face_index>`; the held-out split is a hash of the
image_id (and a seed), so it is the same on every run, every worker and every machine.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import delta, storage
from pipeline.errors import JobError
from pipeline.schemas import nested_list_to_numpy, unsliced
from pipeline.sections import ModelSection
from pipeline.status import STATUS_OK
from pipeline.train_sections import SampleSection

log = logging.getLogger("stbatch.fit")

LATENTS_TABLE = "latents"


# ---------------------------------------------------------------------------- keys and splits

def latent_key(image_id: str, face_index: int) -> str:
    return f"{image_id}:{int(face_index)}"


def hash_fraction(key: str, seed: int = 0) -> float:
    """A stable number in [0, 1) from a key (first 8 bytes of sha256(seed:key))."""
    h = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def split_of(image_id: str, val_fraction: float, seed: int = 0) -> str:
    """`val` for a deterministic `val_fraction` of image ids, else `train` (all faces of one
    image land on the same side)."""
    return "val" if hash_fraction(str(image_id), seed) < float(val_fraction) else "train"


def is_val(image_ids, val_fraction: float, seed: int = 0) -> np.ndarray:
    """`split_of(...) == "val"` for a column of image ids."""
    return np.array([split_of(str(i), val_fraction, seed) == "val" for i in image_ids], dtype=bool)


# ---------------------------------------------------------------------------- tables

def read_table_uri(uri: str, string_columns: tuple[str, ...] = (), null_values: list[str] | None = None) -> pa.Table:
    """A user-supplied table (attributes, edit requests: user-sized): Parquet (file or folder
    of parts) or CSV (`.csv`, `.csv.gz`, `.tsv`). In CSV, `string_columns` are read as text (a
    hex id is never taken for a number) and empty cells are nulls; `null_values` replaces
    pyarrow's list of null spellings (`[""]`: "NA" and "NaN" stay values)."""
    fs, path = storage.url_to_fs(uri)
    if not fs.exists(path):
        raise JobError(f"table not found: {uri}")
    low = path.lower()
    if low.endswith((".csv", ".csv.gz", ".tsv")):
        import pyarrow.csv as pacsv

        with fs.open(path, "rb", compression="infer") as f:
            data = f.read()  # bytes, not the Python file: its reader thread can abort the exit
        return pacsv.read_csv(
            pa.BufferReader(data),
            parse_options=pacsv.ParseOptions(delimiter="\t" if low.endswith(".tsv") else ","),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in string_columns},
                                                 strings_can_be_null=True,
                                                 **({"null_values": null_values} if null_values is not None else {})),
            read_options=pacsv.ReadOptions(use_threads=False))
    try:
        return pq.read_table(path, filesystem=fs)
    except Exception as e:  # noqa: BLE001 - a config error, said clearly
        raise JobError(f"cannot read {uri} as Parquet (or name it .csv): {type(e).__name__}: {e}") from None


def read_latents(root: str, columns: list[str]):
    """The committed `latents` snapshot under a dataset root as a Ray Dataset (`columns` only)."""
    ds = delta.read_snapshot(root, LATENTS_TABLE, columns=columns)
    if ds is None:
        raise JobError(f"no committed latents table under {root} (run jobs.invert first)")
    return ds


def codes_to_numpy(column) -> np.ndarray:
    """A `w_plus`-like column -> float32 [N, n_latent, D] (null rows -> NaN). Accepts the nested
    fixed-size lists the jobs write and the plain `list<list<float>>` that Delta stores (every
    row of one shape)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not isinstance(column, pa.Array) or pa.types.is_fixed_size_list(column.type):
        return nested_list_to_numpy(column)
    n = len(column)
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    present = column.filter(pa.array(valid))
    if len(present) == 0:
        return np.full((n, 0, 0), np.nan, np.float32)
    rows = pc.list_value_length(present).to_numpy(zero_copy_only=False)
    inner = present.flatten()
    cols = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
    nl, d = int(rows[0]), int(cols[0]) if len(cols) else 0
    if (rows != nl).any() or (cols != d).any():
        raise ValueError("w_plus rows of different shapes in one batch")
    dense = np.asarray(inner.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(present), nl, d)
    if valid.all():
        return dense
    out = np.full((n, nl, d), np.nan, np.float32)
    out[valid] = dense
    return out


def _ok_rows(batch: pa.Table) -> pa.Table:
    return unsliced(batch).filter(pc.equal(batch.column("status"), STATUS_OK))


# ---------------------------------------------------------------------------- Ray Data batches

def codes_batch(batch: pa.Table, val_fraction: float, seed: int, keep: str, shape: tuple[int, int]) -> dict:
    """latents rows (status ok) of one split -> `{"key", "w_plus" [B, *shape]}`."""
    t = _ok_rows(batch)
    sel = is_val(t.column("image_id").to_pylist(), val_fraction, seed) == (keep == "val")
    t = t.filter(pa.array(sel))
    keys = np.array([latent_key(i, f) for i, f in zip(t.column("image_id").to_pylist(),
                                                     t.column("face_index").to_pylist())], dtype=object)
    return {"key": keys, "w_plus": codes_or_empty(t, shape)}


def codes_or_empty(t: pa.Table, shape: tuple[int, int]) -> np.ndarray:
    """The `w_plus` of a table as [N, *shape] (an empty batch keeps the shape, so the blocks of
    one dataset agree on their tensor type)."""
    if t.num_rows:
        w = codes_to_numpy(t.column("w_plus"))
        if tuple(w.shape[1:]) != tuple(shape):
            raise ValueError(f"a code of shape {list(w.shape[1:])} in a table of {list(shape)} codes")
        return w
    return np.zeros((0, *shape), np.float32)


def _first_ok(batch: pa.Table) -> pa.Table:
    return _ok_rows(batch).slice(0, 1)


def code_shape(root: str) -> tuple[int, int]:
    """(n_latent, D) of the committed codes, from the first ok row (Delta keeps no fixed shape)."""
    rows = read_latents(root, ["status", "w_plus"]).map_batches(_first_ok, batch_format="pyarrow").take(1)
    if not rows:
        raise JobError(f"no ok codes in the latents table under {root}")
    w = np.asarray([np.asarray(x, np.float32) for x in rows[0]["w_plus"]])
    return int(w.shape[0]), int(w.shape[1])


def _count_block(batch: pa.Table, val_fraction: float, seed: int) -> pa.Table:
    ok = _ok_rows(batch)
    n_val = int(is_val(ok.column("image_id").to_pylist(), val_fraction, seed).sum())
    return pa.table({"n_in": [batch.num_rows], "n_ok": [ok.num_rows], "n_val": [n_val]})


def latent_counts(root: str, val_fraction: float, seed: int) -> dict:
    """Rows of the committed latents table, ok rows, ok rows held out: one record per block to
    the driver, no codes read."""
    ds = read_latents(root, ["image_id", "status"])
    out = {"in": 0, "ok": 0, "val": 0}
    for rec in ds.map_batches(_count_block, batch_format="pyarrow", batch_size=4096,
                              fn_kwargs={"val_fraction": float(val_fraction), "seed": int(seed)}).iter_rows():
        out["in"] += int(rec["n_in"])
        out["ok"] += int(rec["n_ok"])
        out["val"] += int(rec["n_val"])
    return out


class SampleCodes:
    """Actor: codes sampled through the inversion model's own mapping network.

    Row id i -> z_i ~ N(0, I) from a generator seeded with (`sample.seed`, i), so a code depends
    on its id only (not on batching); w = mean + psi * (mapping(z) - mean) with psi
    `sample.truncation`, broadcast to every W+ layer. `mean` is the mapping net's average over
    `sample.mean_n` seeded samples."""

    def __init__(self, model: ModelSection, sample: SampleSection, device: str):
        from pipeline.models import load_model
        from stmodel.device import resolve_device
        from stmodel.stylegan2 import Generator

        self.device = resolve_device(device)
        m, _ = load_model(model)
        decoder = m.decoder
        if not isinstance(decoder, Generator):  # load_model loads the generator by default
            raise TypeError(f"sampling codes needs the model's generator, got {type(decoder).__name__}")
        self.style = decoder.style.to(self.device).eval().requires_grad_(False)
        self.n_latent, self.dim = m.cfg.n_latent, m.cfg.style_dim
        self.psi, self.seed = sample.truncation, sample.seed
        with torch.no_grad():
            self.mean = decoder.to(self.device).mean_latent(sample.mean_n, seed=self.seed + 1)
        del m

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        ids = np.asarray(batch["id"], dtype=np.int64)
        z = np.stack([np.random.default_rng([self.seed, int(i)]).standard_normal(self.dim) for i in ids]) \
            if len(ids) else np.zeros((0, self.dim))
        w = self.style(torch.from_numpy(z.astype(np.float32)).to(self.device))
        w = self.mean + self.psi * (w - self.mean)
        w = w[:, None, :].expand(-1, self.n_latent, -1)
        return {"id": ids, "key": np.array([f"sample-{self.seed}-{i:012d}" for i in ids], dtype=object),
                "w_plus": w.float().cpu().numpy()}


def id_split_batch(batch: dict, n_train: int, keep: str) -> dict:
    """Sampled codes: ids below `n_train` are the train split, the rest the held-out one."""
    sel = (np.asarray(batch["id"]) >= int(n_train)) == (keep == "val")
    return {"key": batch["key"][sel], "w_plus": batch["w_plus"][sel]}


__all__ = ["latent_key", "hash_fraction", "split_of", "is_val", "read_table_uri", "read_latents", "codes_to_numpy",
           "codes_batch", "codes_or_empty", "code_shape", "latent_counts", "SampleCodes", "id_split_batch"]
