"""Ray Train worker loops of the two editing fit jobs, and the data helpers they (and the edit
job) share.

    jobs.fit_classifier  -> classifier_loop   (LatentClassifier, BCE-with-logits, Adam)
    jobs.fit_editor      -> editor_loop       (one EditTransformer per attribute, classifier frozen)

Data reach the workers as Ray datasets (`datasets={"train": ..., "val": ...}`): `train` is split
across the workers (data parallel, DDP when the world size is above 1), `val` is given whole to
every worker and only rank 0 evaluates on it. Rank 0 writes the checkpoints (official layouts)
straight to object storage and returns its figures as the loop's return value
(`Result.return_value`), which the job turns into its table / summary.

Rows are keyed `<image_id>:<face_index>`; the held-out split is a hash of the image_id (and a
seed), so it is the same on every run, every worker and every machine.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.schemas import nested_list_to_numpy

log = logging.getLogger("stbatch.fit")

LATENTS_TABLE = "latents"
KEY_COLUMNS = ("image_id", "face_index", "file", "filename")


# ---------------------------------------------------------------------------- tables and keys

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


def read_table_uri(uri: str, string_columns: tuple[str, ...] = ()) -> pa.Table:
    """A user-supplied table: Parquet (file or folder of parts) or CSV (`.csv`, `.csv.gz`,
    `.tsv`). In CSV, `string_columns` are read as text (a hex id is never taken for a number)
    and empty cells are nulls."""
    fs, path = storage.url_to_fs(uri)
    if not fs.exists(path):
        raise SystemExit(f"table not found: {uri}")
    low = path.lower()
    if low.endswith((".csv", ".csv.gz", ".tsv")):
        import pyarrow.csv as pacsv

        with fs.open(path, "rb", compression="infer") as f:
            data = f.read()  # bytes, not the Python file: its reader thread can abort the exit
        return pacsv.read_csv(
            pa.BufferReader(data),
            parse_options=pacsv.ParseOptions(delimiter="\t" if low.endswith(".tsv") else ","),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in string_columns},
                                                 strings_can_be_null=True),
            read_options=pacsv.ReadOptions(use_threads=False))
    try:
        return pq.read_table(path, filesystem=fs)
    except Exception as e:  # noqa: BLE001 - a config error, said clearly
        raise SystemExit(f"cannot read {uri} as Parquet (or name it .csv): {type(e).__name__}: {e}") from None


def committed_latent_files(uri: str) -> tuple[list[str], object]:
    """Paths (and the filesystem, None for local) of the committed `latents` parts under a
    dataset root, for `ray.data.read_parquet`."""
    files = storage.committed_table_files(uri, LATENTS_TABLE)
    if not files:
        raise SystemExit(f"no committed latents table under {uri} (run jobs.invert first)")
    return storage.ray_paths(uri, files)


def latents_index(uri: str) -> pa.Table:
    """The committed latents rows without their codes (cheap): image_id, face_index, status,
    source_uri, checkpoint_sha256."""
    t = storage.read_committed(uri, LATENTS_TABLE,
                               columns=["image_id", "face_index", "status", "source_uri", "checkpoint_sha256"])
    if t is None:
        raise SystemExit(f"no committed latents table under {uri} (run jobs.invert first)")
    return t


def read_latent_codes(uri: str, keys: set[tuple[str, int]]) -> dict[tuple[str, int], np.ndarray]:
    """W+ codes `[n_latent, D]` of the given (image_id, face_index) keys, status ok only; each
    committed part is read with a filter on image_id, so only the rows needed are kept."""
    ids = sorted({k[0] for k in keys})
    out: dict[tuple[str, int], np.ndarray] = {}
    if not ids:
        return out
    fs, _ = storage.url_to_fs(uri)
    flt = pc.field("image_id").isin(ids) & (pc.field("status") == "ok")
    for f in storage.committed_table_files(uri, LATENTS_TABLE):
        t = pq.read_table(storage.url_to_fs(f)[1], filesystem=fs, filters=flt,
                          columns=["image_id", "face_index", "w_plus"])
        if t.num_rows == 0:
            continue
        w = nested_list_to_numpy(t["w_plus"])
        for i, (iid, fi) in enumerate(zip(t["image_id"].to_pylist(), t["face_index"].to_pylist())):
            if (iid, int(fi)) in keys:
                out[(iid, int(fi))] = w[i]
    return out


# ---------------------------------------------------------------------------- attribute labels

def _label_value(v) -> float | None:
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


def attribute_columns(table: pa.Table, attributes_list=None) -> list[str]:
    """The attribute names: `attributes_list` when given (each must be a column), else every
    numeric/bool column other than the keys, in CelebA's order when they are all CelebA names."""
    from stmodel.classifier import CELEBA_ATTRIBUTES

    if attributes_list:
        names = [str(a) for a in attributes_list]
        missing = [a for a in names if a not in table.column_names]
        if missing:
            raise SystemExit(f"attributes table has no column(s) {missing}; it has {table.column_names}")
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
        raise SystemExit(f"attributes table has no numeric attribute columns: {table.column_names}")
    if set(names) <= set(CELEBA_ATTRIBUTES):
        names = [a for a in CELEBA_ATTRIBUTES if a in names]
    return names


def load_attributes(uri: str, attributes_list=None) -> dict:
    """Read the user's attribute table. Returns `{"names", "join_on", "labels", "invalid"}`:
    `labels` maps a join key (image_id, (image_id, face_index), or a file name) to float32 [K]
    (NaN = missing); `invalid` maps keys whose row holds a value that is not 0/1/-1/bool to
    the reason."""
    t = read_table_uri(uri, string_columns=("image_id", "file", "filename"))
    names = attribute_columns(t, attributes_list)
    if "image_id" in t.column_names:
        join_on = "image_face" if "face_index" in t.column_names else "image_id"
    elif "file" in t.column_names or "filename" in t.column_names:
        join_on = "file"
    else:
        raise SystemExit(f"attributes table needs an image_id column (or file/filename); it has {t.column_names}")
    if join_on == "file":
        col = "file" if "file" in t.column_names else "filename"
        keys = [str(x).rsplit("/", 1)[-1] if x is not None else None for x in t[col].to_pylist()]
    elif join_on == "image_face":
        keys = [(str(a), int(b) if b is not None else 0)
                for a, b in zip(t["image_id"].to_pylist(), t["face_index"].to_pylist())]
    else:
        keys = [str(x) if x is not None else None for x in t["image_id"].to_pylist()]
    cols = [t[n].to_pylist() for n in names]
    labels, invalid = {}, {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        vals = [_label_value(c[i]) for c in cols]
        bad = [n for n, v in zip(names, vals) if v is None]
        if bad:
            invalid[key] = f"invalid label value (not 0/1/-1/bool) in {', '.join(bad[:5])}"
            continue
        labels[key] = np.asarray(vals, dtype=np.float32)
    return {"names": names, "join_on": join_on, "labels": labels, "invalid": invalid}


def attribute_key(join_on: str, image_id: str, face_index: int, source_uri: str | None):
    if join_on == "image_face":
        return (image_id, int(face_index))
    if join_on == "file":
        return (source_uri or "").rsplit("/", 1)[-1]
    return image_id


# ---------------------------------------------------------------------------- Ray Data batches

def labelled_codes_batch(batch: pa.Table, labels: dict, keep: str) -> dict:
    """latents rows -> `{"w_plus" [B, n, D], "labels" [B, K]}` for the rows whose key is in
    `labels` and whose split is `keep` (labels maps `image_id:face` -> (split, float32 [K]))."""
    ids, faces = batch["image_id"].to_pylist(), batch["face_index"].to_pylist()
    st = batch["status"].to_pylist()
    rows, lab = [], []
    for i, (iid, fi, s) in enumerate(zip(ids, faces, st)):
        hit = labels.get(latent_key(iid, fi)) if s == "ok" else None
        if hit is not None and hit[0] == keep:
            rows.append(i)
            lab.append(hit[1])
    k = len(next(iter(labels.values()))[1]) if labels else 0
    w = nested_list_to_numpy(batch["w_plus"].take(pa.array(rows, pa.int64()))) if rows else None
    if w is None:
        shape = _list_shape(batch.schema.field("w_plus").type)
        w = np.zeros((0, *shape), np.float32)
    return {"w_plus": w, "labels": np.asarray(lab, np.float32).reshape(len(rows), k)}


def codes_batch(batch: pa.Table, val_fraction: float, seed: int, keep: str) -> dict:
    """latents rows (status ok) of one split -> `{"key", "w_plus" [B, n, D]}`."""
    ids, faces = batch["image_id"].to_pylist(), batch["face_index"].to_pylist()
    st = batch["status"].to_pylist()
    rows = [i for i, (iid, s) in enumerate(zip(ids, st))
            if s == "ok" and split_of(iid, val_fraction, seed) == keep]
    keys = np.array([latent_key(ids[i], faces[i]) for i in rows], dtype=object)
    if rows:
        w = nested_list_to_numpy(batch["w_plus"].take(pa.array(rows, pa.int64())))
    else:
        w = np.zeros((0, *_list_shape(batch.schema.field("w_plus").type)), np.float32)
    return {"key": keys, "w_plus": w}


def _list_shape(t: pa.DataType) -> tuple[int, ...]:
    shape = []
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    return tuple(shape)


class SampleCodes:
    """Actor: codes sampled through the inversion model's own mapping network.

    Row id i -> z_i ~ N(0, I) from a generator seeded with (seed, i), so a code depends on its
    id only (not on batching); w = mean + psi * (mapping(z) - mean), broadcast to every W+
    layer. `mean` is the mapping net's average over `mean_n` seeded samples."""

    def __init__(self, model: dict, truncation: float = 0.7, seed: int = 0, mean_n: int = 4096,
                 device: str = "cpu"):
        from pipeline.models import load_model, pick_device

        self.device = pick_device(device)
        m, _ = load_model(model)
        self.style = m.decoder.style.to(self.device).eval().requires_grad_(False)
        self.n_latent, self.dim = m.cfg.n_latent, m.cfg.style_dim
        self.psi, self.seed = float(truncation), int(seed)
        with torch.no_grad():
            self.mean = m.decoder.to(self.device).mean_latent(int(mean_n), seed=self.seed + 1)
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


# ---------------------------------------------------------------------------- evaluation maths

def auc_score(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank (Mann-Whitney) formula with average ranks for ties; NaN when one
    class is absent."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks of tied groups (1-based)
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classifier_metrics(logits: np.ndarray, labels: np.ndarray, names: list[str]) -> list[dict]:
    """Per attribute: n_val, accuracy (logit > 0), auc, positive_rate, predicted_positive_rate;
    rows with a missing (NaN) label for that attribute are left out."""
    out = []
    for k, name in enumerate(names):
        m = ~np.isnan(labels[:, k])
        y, s = labels[m, k] > 0.5, logits[m, k]
        n = int(m.sum())
        out.append({"attribute": name, "attribute_index": k, "n_val": n,
                    "accuracy": float(((s > 0) == y).mean()) if n else math.nan,
                    "auc": auc_score(s, y) if n else math.nan,
                    "positive_rate": float(y.mean()) if n else math.nan,
                    "predicted_positive_rate": float((s > 0).mean()) if n else math.nan})
    return out


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits over the labels present (NaN = missing, left out)."""
    mask = ~torch.isnan(labels)
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels), reduction="none")
    return (loss * mask).sum() / mask.sum().clamp_min(1)


# ---------------------------------------------------------------------------- worker helpers

def _setup(t: dict):
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(int(t.get("seed", 0)) + rank)
    if t.get("torch_threads"):
        torch.set_num_threads(int(t["torch_threads"]))
    return rank, world, ray.train.torch.get_device()


def _wrap(model: torch.nn.Module, world: int, device):
    import ray.train.torch

    model.to(device)
    return ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model


def _epoch(shard, t: dict, epoch: int, device):
    return shard.iter_torch_batches(batch_size=int(t["batch_size"]), dtypes=torch.float32, device=str(device),
                                    local_shuffle_buffer_size=int(t.get("shuffle_buffer") or 0) or None,
                                    local_shuffle_seed=int(t.get("seed", 0)) * 100_003 + epoch)


def _collect(ds, columns: list[str], limit: int | None = None) -> dict:
    """A (small) dataset shard into memory as numpy, sorted by `key` when there is one."""
    parts: dict[str, list] = {c: [] for c in columns}
    n = 0
    for b in ds.iter_batches(batch_format="numpy", batch_size=1024):
        for c in columns:
            parts[c].append(np.asarray(b[c]))
        n += len(b[columns[0]])
    out = {c: (np.concatenate(v) if v else np.zeros((0,))) for c, v in parts.items()}
    if "key" in out and len(out["key"]):
        order = np.argsort(out["key"].astype(str), kind="mergesort")
        out = {c: v[order] for c, v in out.items()}
    if limit is not None:
        out = {c: v[:limit] for c, v in out.items()}
    return out


# ---------------------------------------------------------------------------- classifier loop

def classifier_loop(config: dict) -> dict | None:
    """Train a LatentClassifier on (w_plus, labels) batches. Config: `attributes`, `n_latent`,
    `style_dim`, `classifier` {hidden, emb_dim}, `train` {epochs, batch_size, lr,
    weight_decay, seed, ...}, `classifier_uri` (where rank 0 saves it). Rank 0 returns the
    per-epoch history, the held-out metrics and the saved file's sha256."""
    import ray.train

    from stmodel.checkpoint import save_obj
    from stmodel.classifier import LatentClassifier, classifier_state

    t = config["train"]
    rank, world, device = _setup(t)
    names = list(config["attributes"])
    c = config["classifier"]
    torch.manual_seed(int(t.get("seed", 0)))  # the same initial weights on every rank
    model = LatentClassifier(int(config["n_latent"]), int(config["style_dim"]), len(names),
                             hidden=tuple(int(h) for h in c["hidden"]), emb_dim=int(c["emb_dim"]),
                             attributes=names)
    net = _wrap(model, world, device)
    opt = torch.optim.Adam(model.parameters(), lr=float(t["lr"]), weight_decay=float(t.get("weight_decay", 0.0)))
    train = ray.train.get_dataset_shard("train")
    val = _collect(ray.train.get_dataset_shard("val"), ["w_plus", "labels"]) if rank == 0 else None
    history, t0 = [], time.time()

    def evaluate() -> tuple[float, np.ndarray]:
        model.eval()
        logits = []
        with torch.no_grad():
            for i in range(0, len(val["w_plus"]), 1024):
                logits.append(model(torch.from_numpy(val["w_plus"][i:i + 1024]).float().to(device))[0].cpu())
        model.train()
        lg = torch.cat(logits) if logits else torch.zeros(0, len(names))
        return float(masked_bce(lg, torch.from_numpy(val["labels"]).float())) if len(lg) else math.nan, lg.numpy()

    for epoch in range(int(t["epochs"])):
        model.train()
        tot, nb = 0.0, 0
        for batch in _epoch(train, t, epoch, device):
            loss = masked_bce(net(batch["w_plus"])[0], batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, nb = tot + float(loss.detach()), nb + 1
        if rank == 0:
            val_loss = evaluate()[0] if len(val["w_plus"]) else math.nan
            history.append({"epoch": epoch + 1, "train_loss": round(tot / max(nb, 1), 6),
                            "val_loss": round(val_loss, 6), "seconds": round(time.time() - t0, 2)})
            if (epoch + 1) % int(t.get("log_every", 1) or 1) == 0 or epoch + 1 == int(t["epochs"]):
                log.info("classifier epoch %d/%d: train BCE %.4f, val BCE %.4f", epoch + 1, int(t["epochs"]),
                         history[-1]["train_loss"], val_loss)
    if rank != 0:
        return None
    model.eval()
    _, logits = evaluate()
    state = classifier_state(model.cpu())
    state["opts"].update({"trained_by": "jobs.fit_classifier", "epochs": int(t["epochs"]),
                          "run_id": config.get("run_id")})
    sha = save_obj(state, config["classifier_uri"])
    return {"history": history, "eval": classifier_metrics(logits, val["labels"], names), "sha256": sha}


# ---------------------------------------------------------------------------- editor loop

def _editor_figures(editor, classifier, ws, wr, k, weights) -> dict:
    """Mean loss parts of `editor` on fixed (source, reference) pairs, plus the distance of the
    source's own target embedding to the reference's (what an identity editor would score)."""
    from stmodel.editor import editor_loss

    editor.eval()
    with torch.no_grad():
        parts = {"l2": 0.0, "ref": 0.0, "src": 0.0, "total": 0.0}
        ident, n = 0.0, 0
        for i in range(0, len(ws), 256):
            s, r = ws[i:i + 256], wr[i:i + 256]
            _, p = editor_loss(s, r, editor(s, r), classifier, k, weights)
            m = len(s)
            for key in parts:
                parts[key] += float(p[key]) * m
            _, es = classifier(s)
            _, er = classifier(r)
            ident += float(F.mse_loss(es[:, k], er[:, k])) * m
            n += m
    editor.train()
    out = {key: round(v / max(n, 1), 6) for key, v in parts.items()}
    out["identity_ref"] = round(ident / max(n, 1), 6)
    out["pairs"] = n
    return out


def editor_loop(config: dict) -> dict | None:
    """Train one EditTransformer per attribute against the frozen classifier (official loss,
    each batch split in halves: sources, references). Config: `attributes`, `classifier_uri`
    (+ `classifier_sha256`), `editor` {n_heads, ff_dim, dropout, query_norm}, `loss` {l2, ref,
    src}, `train` {steps, batch_size, lr, weight_decay, seed, ...}, `eval` {max_pairs},
    `editor_uris` {attribute: URI}. Rank 0 returns per-attribute figures before/after."""
    import ray.train

    from stmodel.checkpoint import save_obj
    from stmodel.classifier import load_classifier
    from stmodel.editor import EditTransformer, editor_loss, editor_state

    t = config["train"]
    rank, world, device = _setup(t)
    clf = load_classifier(config["classifier_uri"], sha256=config.get("classifier_sha256"))
    clf.to(device).eval().requires_grad_(False)
    lw = config["loss"]
    weights = (float(lw["l2"]), float(lw["ref"]), float(lw["src"]))
    e = config["editor"]
    train = ray.train.get_dataset_shard("train")
    pairs = None
    if rank == 0:
        v = _collect(ray.train.get_dataset_shard("val"), ["key", "w_plus"], 2 * int(config["eval"]["max_pairs"]))
        w = torch.from_numpy(v["w_plus"]).float().to(device)
        h = len(w) // 2
        pairs = (w[:h], w[h:2 * h])
    results = {}
    for a_i, attr in enumerate(config["attributes"]):
        k = clf.attribute_index(attr)
        torch.manual_seed(int(t.get("seed", 0)) + 7919 * a_i)
        editor = EditTransformer(clf.style_dim, int(e["n_heads"]), int(e["ff_dim"]), float(e["dropout"]),
                                 bool(e["query_norm"]))
        net = _wrap(editor, world, device)
        opt = torch.optim.Adam(editor.parameters(), lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))
        before = _editor_figures(editor, clf, *pairs, k, weights) if rank == 0 and len(pairs[0]) else None
        editor.train()
        step, epoch, t0, history = 0, 0, time.time(), []
        total_steps = int(t["steps"])
        while step < total_steps:
            seen = 0
            for batch in _epoch(train, t, epoch, device):
                w = batch["w_plus"]
                h = w.shape[0] // 2
                if h == 0:
                    continue
                ws, wr = w[:h], w[h:2 * h]
                loss, parts = editor_loss(ws, wr, net(ws, wr), clf, k, weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step, seen = step + 1, seen + 1
                if rank == 0 and (step % int(t.get("log_every", 100)) == 0 or step == total_steps):
                    history.append({"step": step, **{p: round(float(x), 6) for p, x in parts.items()},
                                    "seconds": round(time.time() - t0, 2)})
                    log.info("editor %s step %d/%d: %s", attr, step, total_steps,
                             " ".join(f"{p}={float(x):.4f}" for p, x in parts.items()))
                if step >= total_steps:
                    break
            epoch += 1
            if seen == 0:
                raise RuntimeError("editor training: the train shard yielded no batch of 2 or more codes")
        if rank != 0:
            continue
        after = _editor_figures(editor, clf, *pairs, k, weights) if len(pairs[0]) else None
        state = editor_state(editor, clf, None, {
            "attribute": attr, "attribute_index": k, "trained_by": "jobs.fit_editor", "steps": step,
            "loss_weights": list(weights), "eval_before": before, "eval_after": after,
            "run_id": config.get("run_id")})
        uri = config["editor_uris"][attr]
        sha = save_obj(state, uri)
        results[attr] = {"uri": uri, "sha256": sha, "steps": step, "before": before, "after": after,
                         "history": history, "seconds": round(time.time() - t0, 2)}
    return results if rank == 0 else None


__all__ = ["latent_key", "hash_fraction", "split_of", "read_table_uri", "committed_latent_files", "latents_index",
           "read_latent_codes", "load_attributes", "attribute_key", "labelled_codes_batch", "codes_batch",
           "SampleCodes", "id_split_batch", "auc_score", "classifier_metrics", "masked_bce", "classifier_loop", "editor_loop"]
