"""Report job: one self-contained HTML page about a dataset root written by this project's jobs.

    python -m jobs.report --set input=URI [--set output=URI] [--set report.max_images=32]

Reads what exists under `input` (committed runs only: `_runs/*.json` manifests and the table
files they list; `train/log.jsonl`, `train/grids/*.png`, `train/eval.json`) and writes
`<output or input>/report/index.html`: a job table with counts and timings (accounting
mismatches flagged), face-alignment status and crops, input | reconstruction pairs, metric
histograms, the per-layer W+ norm, edit grids and an attribute x kind summary, training loss
curves and grids. Images are embedded as downscaled data: URIs and charts as inline SVG, so
the one file opens offline. Parts that are absent are named as missing; unreadable parts are
reported in the page, never a crash.

Needs no Ray. Counts are per report part (jobs, faces, latents, metrics, edits, training):
ok = built, skipped = absent from the dataset, failed = could not be built (shown as an error
in its place); the summary's `runs` is the number of committed runs read.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
import time
from collections import Counter, OrderedDict
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.cli import main
from pipeline import report_html as H
from pipeline import storage
from pipeline.schemas import nested_list_to_numpy

log = logging.getLogger("stbatch.report")

JOB = "report"
METRICS = ("psnr", "lpips", "id_similarity", "mse")
TRAIN_KEYS = ("loss", "l2", "lpips", "id", "wnorm")

DEFAULTS = {
    "input": None,    # dataset root written by the project's jobs
    "output": None,   # where report/index.html goes (default: input)
    "progress": True,
    "report": {
        "title": None,            # page title (default: "Dataset report: <input>")
        "max_images": 16,         # crops / input|reconstruction pairs / edited faces shown
        "max_edits_per_image": 8,
        "thumb_px": 128,          # longer side of embedded thumbnails
        "thumb_format": "png",    # png | jpeg (smaller)
        "max_failed": 50,         # failed inputs listed with their error text
        "max_wplus_rows": 2000,   # W+ codes read for the per-layer norm plot
        "bins": 20,
        "max_train_grids": 3,     # newest train/grids/*.png embedded
        "grid_px": 768,
    },
}


# ---------------------------------------------------------------------------------------------
# Reading (tolerant: every problem becomes a note in the page)


def _manifests(root: str, notes: list[str]) -> list[dict]:
    """Committed run manifests, oldest first; unreadable ones become notes (the same rule as
    `storage.committed_manifests`, but a corrupt manifest does not stop the report)."""
    fs, base = storage.url_to_fs(storage.join(root, storage.RUNS_DIR))
    if not fs.exists(base):
        return []
    out = []
    for p in sorted(fs.glob(f"{base}/*.json")):
        try:
            with fs.open(p, "rb") as f:
                m = json.loads(f.read())
            if not isinstance(m, dict):
                raise ValueError("not a JSON object")
            out.append(m)
        except Exception as e:  # noqa: BLE001
            notes.append(f"unreadable manifest {p.rsplit('/', 1)[-1]}: {e}")
    return out


def _read_table(root: str, manifests: list[dict], table: str, notes: list[str],
                columns: list[str] | None = None, exclude: tuple = (),
                skip_lists: bool = False) -> pa.Table | None:
    """Rows of `table` from committed runs only (files listed in the manifests). Requested
    columns a file lacks are simply absent; `skip_lists` leaves out list-typed columns (codes,
    logit vectors: the report shows scalars only); unreadable files become notes."""
    fs, _ = storage.url_to_fs(root)
    parts = []
    for m in manifests:
        for rel in (m.get("tables") or {}).get(table, []) or []:
            uri = storage.join(root, rel)
            try:
                _, path = storage.url_to_fs(uri)
                pf = pq.ParquetFile(path, filesystem=fs)
                sch = pf.schema_arrow
                names = sch.names
                cols = [c for c in (columns or names) if c in names and c not in exclude and not (
                    skip_lists and (pa.types.is_list(sch.field(c).type) or pa.types.is_fixed_size_list(
                        sch.field(c).type) or pa.types.is_large_list(sch.field(c).type)))]
                parts.append(pf.read(columns=cols))
            except Exception as e:  # noqa: BLE001
                notes.append(f"{table}: unreadable file {rel}: {e}")
    if not parts:
        return None
    try:
        return pa.concat_tables(parts, promote_options="permissive")
    except Exception:  # noqa: BLE001  (incompatible types across runs: keep the common columns)
        common = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
        return pa.concat_tables([p.select(common).cast(parts[0].select(common).schema, safe=False)
                                 for p in parts], promote_options="permissive")


def _uncommitted(root: str, table: str, committed: set) -> list[str]:
    fs, base = storage.url_to_fs(storage.join(root, table))
    try:
        if not fs.exists(base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
    except Exception:  # noqa: BLE001
        return []
    return [n[4:] for n in names if n.startswith("run=") and n[4:] not in committed]


def _col(t: pa.Table | None, name: str) -> list:
    if t is None:
        return []
    return t[name].to_pylist() if name in t.column_names else [None] * t.num_rows


def _exists(uri: str) -> bool:
    try:
        fs, path = storage.url_to_fs(uri)
        return fs.exists(path)
    except Exception:  # noqa: BLE001
        return False


class Images:
    """Reads, downscales and embeds images once each; a missing one becomes a placeholder."""

    def __init__(self, root: str, old_roots: list[str], px: int, fmt: str):
        self.root, self.px, self.fmt = root, int(px), fmt
        self.old_roots = sorted({r.rstrip("/") for r in old_roots if r and r.rstrip("/") != root.rstrip("/")},
                                key=len, reverse=True)
        self.cache: dict[tuple, tuple[str | None, str]] = {}
        self.embedded = 0
        self.missing = 0

    def _candidates(self, uri: str) -> list[str]:
        if "://" not in uri and not uri.startswith("/"):
            return [storage.join(self.root, uri)]
        out = [uri]
        for old in self.old_roots:  # the dataset was moved or copied: rebase onto this root
            if uri.startswith(old + "/"):
                out.append(storage.join(self.root, uri[len(old) + 1:]))
        return out

    def data_uri(self, uri: str | None, px: int | None = None) -> tuple[str | None, str]:
        px = int(px or self.px)
        if not uri:
            return None, "no image"
        key = (uri, px)
        if key not in self.cache:
            res: tuple[str | None, str] = (None, "missing")
            for cand in self._candidates(uri):
                try:
                    res = (H.thumbnail_data_uri(storage.read_bytes(cand), px, self.fmt), "")
                    break
                except FileNotFoundError:
                    res = (None, "missing")
                except Exception as e:  # noqa: BLE001
                    res = (None, f"unreadable: {type(e).__name__}")
            self.cache[key] = res
            if res[0]:
                self.embedded += 1
            else:
                self.missing += 1
        return self.cache[key]

    def cell(self, uri: str | None, caption: str = "", title: str = "", px: int | None = None) -> str:
        src, why = self.data_uri(uri, px)
        return H.img_cell(src, caption, size=int(px or self.px), title=f"{title or caption}\n{uri or ''}".strip(),
                          reason=why)


# ---------------------------------------------------------------------------------------------
# Sections: each returns body HTML, or None when its part of the dataset is absent


def _status_table(statuses: list) -> str:
    c = Counter("(null)" if s is None else s for s in statuses)
    rows = sorted(c.items(), key=lambda kv: (kv[0] != "ok", -kv[1], kv[0]))
    return H.table(["status", "rows"], rows, numeric=[False, True])


def _where(t: pa.Table, status=None, not_status=None, nonnull=()) -> pa.Table:
    """Rows of `t` by status (== `status`, or not in `not_status`) whose `nonnull` columns are set
    (a missing column matches nothing); done in Arrow so a big table is never turned into dicts."""
    mask = pa.array(np.ones(t.num_rows, dtype=bool))
    for c in nonnull:
        if c not in t.column_names:
            return t.slice(0, 0)
        mask = pc.and_(mask, pc.is_valid(t[c]))
    if status is not None or not_status is not None:
        if "status" not in t.column_names:
            return t.slice(0, 0)
        st = t["status"]
        cond = pc.equal(st, status) if status is not None else \
            pc.invert(pc.is_in(st, value_set=pa.array(list(not_status), pa.string())))
        mask = pc.and_(mask, pc.fill_null(cond, False))
    return t.filter(mask)


def _failed_list(t: pa.Table, max_n: int, key_col: str) -> str:
    bad_t = _where(t, not_status=("ok", "duplicate"), nonnull=("status",))
    if not bad_t.num_rows:
        return ""
    shown = bad_t.slice(0, max_n).to_pylist()
    body = H.table([key_col, "status", "error"],
                   [(H.esc(r.get(key_col) or r.get("image_id")), H.esc(r.get("status")),
                     f'<pre class="err">{H.esc(r.get("error") or "")}</pre>') for r in shown], raw=True)
    more = H.missing(f"... and {bad_t.num_rows - len(shown)} more") if bad_t.num_rows > len(shown) else ""
    return f"<h3>Failed ({bad_t.num_rows})</h3>{body}{more}"


def _histograms(t: pa.Table, bins: int) -> str:
    items = [H.svg_histogram(_col(t, m), m, bins=bins, color=H.PALETTE[i % len(H.PALETTE)])
             for i, m in enumerate(METRICS) if len(H.finite(_col(t, m)))]
    return H.charts(items) if items else H.missing("no reconstruction metrics in this table")


def _metric_summary_table(t: pa.Table) -> str:
    rows = []
    for m in METRICS:
        v = H.finite(_col(t, m))
        if v.size:
            rows.append((m, v.size, v.mean(), np.percentile(v, 50), np.percentile(v, 95), v.min(), v.max()))
    return H.table(["metric", "n", "mean", "p50", "p95", "min", "max"], rows,
                   numeric=[False] + [True] * 6) if rows else ""


def _labels(t: pa.Table | None) -> list[str]:
    return sorted({x for x in _col(t, "metric_backbones") if x})


def section_jobs(ctx: dict) -> str | None:
    ms = ctx["manifests"]
    if not ms:
        return None
    rows, classes = [], []
    bad = 0
    for m in sorted(ms, key=lambda m: str(m.get("started_at") or "")):
        s = m.get("summary") if isinstance(m.get("summary"), dict) else {}
        n = {k: s.get(k) for k in ("in", "ok", "failed", "skipped")}
        try:
            mismatch = all(v is not None for v in n.values()) and \
                int(n["in"]) != int(n["ok"]) + int(n["failed"]) + int(n["skipped"])
        except (TypeError, ValueError):
            mismatch = True
        flag = ('<span class="flag">MISMATCH: in != ok + failed + skipped</span>' if mismatch else
                ("incomplete counts" if any(v is None for v in n.values()) else "ok"))
        bad += mismatch
        rows.append([H.esc(m.get("job")), H.esc(m.get("run_id")), H.esc(m.get("started_at")),
                     H.esc(m.get("finished_at"))] + [H.fmt(n[k]) for k in ("in", "ok", "failed", "skipped")]
                    + [H.fmt(s.get("seconds")), flag])
        classes.append("mismatch" if mismatch else "")
    head = ["job", "run_id", "started", "finished", "in", "ok", "failed", "skipped", "seconds", "accounting"]
    out = [H.table(head, rows, classes, numeric=[False] * 4 + [True] * 5 + [False], raw=True)]
    if bad:
        out.insert(0, H.banner(f"{bad} run(s) break the accounting rule in = ok + failed + skipped.", "error"))
    # per-run metric summaries recorded in the manifests
    mrows = []
    for m in ms:
        met = (m.get("summary") or {}).get("metrics") if isinstance(m.get("summary"), dict) else None
        if not isinstance(met, dict):
            continue
        for k, v in met.items():
            if isinstance(v, dict):
                mrows.append((m.get("job"), m.get("run_id"), k, v.get("mean"), v.get("p50"), v.get("p95"), v.get("n")))
    if mrows:
        out.append("<h3>Metric summaries recorded by the runs</h3>")
        out.append(H.table(["job", "run_id", "metric", "mean", "p50", "p95", "n"], mrows,
                           numeric=[False] * 3 + [True] * 4))
    return "".join(out)


def section_faces(ctx: dict) -> str | None:
    t = ctx["faces"]
    if t is None:
        return None
    cfg = ctx["cfg"]
    out = [f"<p>{t.num_rows} rows.</p>", _status_table(_col(t, "status"))]
    ok = _where(t, status="ok", nonnull=("aligned_uri",))
    if ok.num_rows:
        shown = ok.slice(0, cfg["max_images"]).to_pylist()
        out.append(f"<h3>Aligned crops (first {len(shown)} of {ok.num_rows})</h3>")
        cells = []
        for r in shown:
            cap = f"{str(r.get('image_id') or '')[:10]}"
            if H.to_float(r.get("det_score")) is not None:
                cap += f" s={r['det_score']:.2f}"
            cells.append(ctx["images"].cell(r["aligned_uri"], cap, title=r.get("source_uri") or ""))
        out.append(H.grid(cells))
    else:
        out.append(H.missing("no aligned crops (no row with status ok)"))
    if len(H.finite(_col(t, "det_score"))):
        out.append(H.charts([H.svg_histogram(_col(t, "det_score"), "det_score", bins=cfg["bins"])]))
    out.append(_failed_list(t, cfg["max_failed"], "source_uri"))
    return "".join(out)


def _wplus_norms(ctx: dict) -> str:
    """Mean +- std of ||w_l|| per W+ layer over (up to max_wplus_rows) ok codes."""
    root, cap = ctx["root"], int(ctx["cfg"]["max_wplus_rows"])
    fs, _ = storage.url_to_fs(root)
    total, s1, s2 = 0, None, None
    for m in ctx["manifests"]:
        for rel in (m.get("tables") or {}).get("latents", []) or []:
            if total >= cap:
                break
            try:
                _, path = storage.url_to_fs(storage.join(root, rel))
                pf = pq.ParquetFile(path, filesystem=fs)
                if "w_plus" not in pf.schema_arrow.names:
                    continue
                cols = ["w_plus"] + (["status"] if "status" in pf.schema_arrow.names else [])
                for b in pf.iter_batches(batch_size=256, columns=cols):
                    if total >= cap:
                        break
                    w = nested_list_to_numpy(b.column(b.schema.get_field_index("w_plus")))
                    if w.ndim != 3:
                        return H.missing(f"w_plus has shape {w.shape[1:]}, expected [layers, dim]")
                    keep = np.isfinite(w).all(axis=(1, 2))
                    if "status" in cols:
                        keep &= np.array([s == "ok" for s in b.column(1).to_pylist()], dtype=bool)
                    w = w[keep][: cap - total]
                    if not len(w):
                        continue
                    norms = np.linalg.norm(w.astype(np.float64), axis=-1)  # [n, L]
                    if s1 is not None and norms.shape[1] != s1.shape[0]:
                        continue  # another model's layer count: keep the first
                    s1 = norms.sum(0) if s1 is None else s1 + norms.sum(0)
                    s2 = (norms ** 2).sum(0) if s2 is None else s2 + (norms ** 2).sum(0)
                    total += len(w)
            except Exception as e:  # noqa: BLE001
                ctx["notes"].append(f"latents: W+ of {rel} unreadable: {e}")
    if not total:
        return H.missing("no W+ codes to plot")
    mean = s1 / total
    std = np.sqrt(np.maximum(s2 / total - mean ** 2, 0))
    return H.svg_bar_chart(mean, [str(i) for i in range(len(mean))],
                           f"mean ||w_l|| per W+ layer (n={total})", ylabel="L2 norm", xlabel="layer l",
                           errors=std, width=max(360, 24 * len(mean) + 80))


def section_latents(ctx: dict) -> str | None:
    t = ctx["latents"]
    if t is None:
        return None
    cfg, imgs = ctx["cfg"], ctx["images"]
    out = [f"<p>{t.num_rows} rows.</p>"]
    labels = _labels(t)
    out.append(H.random_init_warning(labels))
    out.append(H.labels_line("Metric backbones", labels) if labels else "")
    models = Counter((m, (c or "")[:12]) for m, c in zip(_col(t, "model"), _col(t, "checkpoint_sha256")) if m)
    if models:
        out.append(H.table(["model", "checkpoint sha256", "rows"], [(a, b, n) for (a, b), n in models.items()],
                           numeric=[False, False, True]))
    out.append(_status_table(_col(t, "status")))
    pairs = _where(t, status="ok", nonnull=("reconstruction_uri",))
    if pairs.num_rows:
        shown = pairs.slice(0, cfg["max_images"]).to_pylist()
        out.append(f"<h3>Input | reconstruction (first {len(shown)} of {pairs.num_rows})</h3>")
        for r in shown:
            metr = "  ".join(f"{m}={H.fmt(r.get(m), 3)}" for m in METRICS if H.to_float(r.get(m)) is not None)
            out.append(H.pair_row(str(r.get("image_id") or "")[:10],
                                  [imgs.cell(r.get("aligned_uri"), "input"),
                                   imgs.cell(r.get("reconstruction_uri"), "reconstruction", title=metr)],
                                  title=f"{r.get('image_id')} face {r.get('face_index')}\n{metr}"))
    else:
        out.append(H.missing("no reconstructions (run jobs.invert with metrics=true, or jobs.evaluate)"))
    out.append("<h3>Reconstruction metrics</h3>")
    out.append(_metric_summary_table(t))
    out.append(_histograms(t, cfg["bins"]))
    out.append("<h3>W+ codes</h3>")
    out.append(_wplus_norms(ctx))
    out.append(_failed_list(t, cfg["max_failed"], "aligned_uri"))
    return "".join(out)


def section_metrics(ctx: dict) -> str | None:
    t = ctx["metrics"]
    if t is None:
        return None
    cfg = ctx["cfg"]
    labels = _labels(t)
    out = [f"<p>{t.num_rows} rows.</p>", H.random_init_warning(labels),
           H.labels_line("Metric backbones", labels) if labels else "",
           _status_table(_col(t, "status")), _metric_summary_table(t), _histograms(t, cfg["bins"])]
    if ctx["latents"] is None or not _where(ctx["latents"], nonnull=("reconstruction_uri",)).num_rows:
        pairs = _where(t, status="ok", nonnull=("reconstruction_uri",))
        if pairs.num_rows:
            shown = pairs.slice(0, cfg["max_images"]).to_pylist()
            out.append(f"<h3>Input | reconstruction (first {len(shown)} of {pairs.num_rows})</h3>")
            for r in shown:
                out.append(H.pair_row(str(r.get("image_id") or "")[:10],
                                      [ctx["images"].cell(r.get("aligned_uri"), "input"),
                                       ctx["images"].cell(r.get("reconstruction_uri"), "reconstruction")]))
    out.append(_failed_list(t, cfg["max_failed"], "image_id"))
    return "".join(out)


def _mean(vals) -> float | None:
    v = H.finite(vals)
    return float(v.mean()) if v.size else None


def section_edits(ctx: dict) -> str | None:
    t = ctx["edits"]
    if t is None:
        return None
    cfg, imgs = ctx["cfg"], ctx["images"]
    rows = t.to_pylist()
    has = set(t.column_names)
    out = [f"<p>{t.num_rows} rows.</p>"]
    if "status" in has:
        out.append(_status_table(_col(t, "status")))
    labels = _labels(t)
    out.append(H.random_init_warning(labels))
    out.append(H.labels_line("Metric backbones", labels) if labels else "")
    # where the unedited face is: the edit row itself, else the latents / faces tables
    known: dict[str, str] = {}
    for src in (ctx["faces"], ctx["latents"]):
        for iid, uri in zip(_col(src, "image_id"), _col(src, "aligned_uri")):
            if iid and uri:
                known.setdefault(iid, uri)
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for r in rows:
        groups.setdefault(r.get("image_id") or "(no image_id)", []).append(r)
    shown = list(groups.items())[: cfg["max_images"]]
    if "output_uri" in has and shown:
        out.append(f"<h3>Input | edits (first {len(shown)} of {len(groups)} faces)</h3>")
        for iid, grp in shown:
            src = next((r.get(c) for r in grp for c in ("source_uri", "aligned_uri", "input_uri") if r.get(c)), None)
            src = src or known.get(iid)
            cells = [imgs.cell(src, "input")]
            for r in grp[: cfg["max_edits_per_image"]]:
                cap = " ".join(str(x) for x in (r.get("attribute"), r.get("kind")) if x)
                if H.to_float(r.get("strength")) is not None:
                    cap += f" {float(r['strength']):+g}"
                lb, la = H.to_float(r.get("logit_before")), H.to_float(r.get("logit_after"))
                tip = "  ".join(s for s in (
                    f"logit {lb:.2f} -> {la:.2f}" if lb is not None and la is not None else "",
                    f"id={H.fmt(r.get('id_similarity'), 3)}" if H.to_float(r.get("id_similarity")) is not None else "",
                    f"lpips={H.fmt(r.get('lpips'), 3)}" if H.to_float(r.get("lpips")) is not None else "",
                    f"ref={r.get('reference_image_id')}" if r.get("reference_image_id") else "",
                    f"{r.get('status')}: {r.get('error')}" if r.get("status") not in (None, "ok") else "") if s)
                if r.get("status") not in (None, "ok") and not r.get("output_uri"):
                    cells.append(H.img_cell(None, cap or "edit", cfg["thumb_px"], tip, str(r.get("status"))))
                else:
                    cells.append(imgs.cell(r.get("output_uri"), cap or "edit", title=tip))
            more = len(grp) - cfg["max_edits_per_image"]
            if more > 0:
                cells.append(H.missing(f"+{more} more"))
            out.append(H.pair_row(str(iid)[:10], cells, title=str(iid)))
    elif "output_uri" not in has:
        out.append(H.missing("the edits table has no output_uri column: no images to show"))
    # attribute x kind summary
    agg: OrderedDict[tuple, dict] = OrderedDict()
    for r in rows:
        k = (r.get("attribute") or "—", r.get("kind") or "—")
        a = agg.setdefault(k, {"n": 0, "ok": 0, "dlogit": [], "id": [], "lpips": [], "strength": []})
        a["n"] += 1
        if r.get("status") not in (None, "ok"):
            continue
        a["ok"] += 1
        lb, la = H.to_float(r.get("logit_before")), H.to_float(r.get("logit_after"))
        if lb is not None and la is not None:
            a["dlogit"].append(la - lb)
        a["id"].append(r.get("id_similarity"))
        a["lpips"].append(r.get("lpips"))
        a["strength"].append(r.get("strength"))
    srows = [(att, kind, a["n"], a["ok"], _mean(a["strength"]), _mean(a["dlogit"]), _mean(a["id"]), _mean(a["lpips"]))
             for (att, kind), a in sorted(agg.items())]
    out.append("<h3>By attribute and kind (ok rows)</h3>")
    out.append(H.table(["attribute", "kind", "rows", "ok", "mean strength", "mean logit change",
                        "mean ID similarity", "mean LPIPS"], srows, numeric=[False, False] + [True] * 6))
    hist = [H.svg_histogram(_col(t, c), c, bins=cfg["bins"]) for c in ("id_similarity", "lpips")
            if len(H.finite(_col(t, c)))]
    if hist:
        out.append(H.charts(hist))
    out.append(_failed_list(t, cfg["max_failed"], "edit_id" if "edit_id" in has else "image_id"))
    return "".join(out)


def section_training(ctx: dict) -> str | None:
    root, cfg, imgs = ctx["root"], ctx["cfg"], ctx["images"]
    found = False
    out = []
    log_uri = storage.join(root, "train", "log.jsonl")
    if _exists(log_uri):
        found = True
        recs, bad = [], 0
        try:
            for line in storage.read_bytes(log_uri).decode("utf-8", "replace").splitlines():
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    if isinstance(r, dict):
                        recs.append(r)
                    else:
                        bad += 1
                except ValueError:
                    bad += 1
        except Exception as e:  # noqa: BLE001
            out.append(H.banner(f"train/log.jsonl unreadable: {e}", "error"))
        if recs:
            xs = [r.get("step", i) for i, r in enumerate(recs)]
            keys = [k for k in TRAIN_KEYS if any(H.to_float(r.get(k)) is not None for r in recs)]
            keys += sorted({k for r in recs for k, v in r.items() if k not in TRAIN_KEYS and k not in
                            ("step", "seconds", "time", "epoch", "lr") and H.to_float(v) is not None})[:4]
            last = recs[-1]
            out.append(f"<p>{len(recs)} log lines; last step {H.esc(last.get('step', len(recs) - 1))}"
                       + (f", {H.fmt(last.get('seconds'))} s" if H.to_float(last.get("seconds")) is not None else "")
                       + (f", {bad} unparsable line(s) skipped" if bad else "") + ".</p>")
            out.append(H.table(["key", "first", "last", "min"],
                               [(k, _last(recs[::-1], k), _last(recs, k), H.finite([r.get(k) for r in recs]).min())
                                for k in keys],
                               numeric=[False, True, True, True]))
            out.append(H.charts([H.svg_line_chart({k: (xs, [r.get(k) for r in recs])}, k, xlabel="step")
                                 for k in keys]))
        else:
            out.append(H.missing("train/log.jsonl has no records"))
    else:
        out.append(H.missing("no train/log.jsonl"))
    grids = _train_grids(root, ctx["notes"])
    if grids:
        found = True
        shown = grids[: int(cfg["max_train_grids"])]
        out.append(f"<h3>Training grids (newest {len(shown)} of {len(grids)})</h3>")
        out.append(H.grid([imgs.cell(u, u.rsplit("/", 1)[-1], px=int(cfg["grid_px"])) for u in shown]))
    eval_uri = storage.join(root, "train", "eval.json")
    if _exists(eval_uri):
        found = True
        out.append("<h3>Evaluation (train/eval.json)</h3>")
        try:
            out.append(_eval_table(json.loads(storage.read_bytes(eval_uri))))
        except Exception as e:  # noqa: BLE001
            out.append(H.banner(f"train/eval.json unreadable: {e}", "error"))
    return "".join(out) if found else None


def _last(recs: list[dict], k: str):
    for r in reversed(recs):
        if H.to_float(r.get(k)) is not None:
            return r[k]
    return None


def _train_grids(root: str, notes: list[str]) -> list[str]:
    """train/grids/*.png, newest first (by modification time where the store says, else name)."""
    try:
        fs, base = storage.url_to_fs(storage.join(root, "train", "grids"))
        if not fs.exists(base):
            return []
        items = []
        for p, info in fs.glob(f"{base}/*.png", detail=True).items():
            t = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
            if isinstance(t, _dt.datetime):
                t = t.timestamp()
            try:
                t = float(t)
            except (TypeError, ValueError):
                t = 0.0
            items.append((t, p))
        items.sort(key=lambda x: (x[0], x[1]), reverse=True)
        return [storage.full_uri(fs, p) for _, p in items]
    except Exception as e:  # noqa: BLE001
        notes.append(f"train/grids unreadable: {e}")
        return []


def _flatten(d, prefix="") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix or "value"] = d
    return out


def _eval_table(ev) -> str:
    """{"trained": {"psnr": ..}, "mean_latent": {...}} -> rows = variants, columns = metrics;
    anything else is shown flattened as key | value."""
    if isinstance(ev, dict) and ev and all(isinstance(v, dict) for v in ev.values()):
        flat = {name: _flatten(v) for name, v in ev.items()}
        cols = list(OrderedDict.fromkeys(k for f in flat.values() for k in f))
        rows = [[name] + [f.get(c) for c in cols] for name, f in flat.items()]
        num = [False] + [all(H.to_float(r[i + 1]) is not None or r[i + 1] is None for r in rows)
                         for i in range(len(cols))]
        return H.table([""] + cols, rows, numeric=num)
    flat = _flatten(ev)
    return H.table(["key", "value"], list(flat.items()),
                   numeric=[False, all(H.to_float(v) is not None for v in flat.values())])


# ---------------------------------------------------------------------------------------------


SECTIONS: list[tuple[str, str, Callable[[dict], str | None], str]] = [
    ("jobs", "Jobs", section_jobs, "no committed runs (_runs/*.json)"),
    ("faces", "Faces (jobs.align)", section_faces, "no committed faces table (run jobs.align)"),
    ("latents", "Latents (jobs.invert)", section_latents, "no committed latents table (run jobs.invert)"),
    ("metrics", "Metrics (jobs.evaluate)", section_metrics, "no committed metrics table (run jobs.evaluate)"),
    ("edits", "Edits (jobs.edit)", section_edits, "no committed edits table (run jobs.edit)"),
    ("training", "Training (jobs.train_encoder)", section_training,
     "no train/log.jsonl, train/grids/ or train/eval.json (run jobs.train_encoder)"),
]


def build_report(root: str, rcfg: dict) -> tuple[str, dict]:
    """The HTML of the report for dataset `root`, and counts {runs, sections, missing, images}."""
    notes: list[str] = []
    manifests = _manifests(root, notes)
    committed = {m.get("run_id") for m in manifests}
    ctx = {"root": root, "cfg": rcfg, "manifests": manifests, "notes": notes,
           "images": Images(root, [m.get("output") for m in manifests], rcfg["thumb_px"], rcfg["thumb_format"])}
    for table in ("faces", "latents", "metrics", "edits"):
        try:
            ctx[table] = _read_table(root, manifests, table, notes, skip_lists=True)
        except Exception as e:  # noqa: BLE001
            notes.append(f"{table}: {e}")
            ctx[table] = None
        stale = _uncommitted(root, table, committed)
        if stale:
            notes.append(f"{table}: ignored {len(stale)} uncommitted run folder(s) (no manifest): "
                         + ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else ""))
    done, absent, failed = [], [], 0
    for anchor, title, fn, why in SECTIONS:
        try:
            body = fn(ctx)
        except Exception as e:  # noqa: BLE001  (one broken part must not hide the others)
            log.exception("report section %s failed", anchor)
            body = H.banner(f"this section could not be built: {type(e).__name__}: {e}", "error")
            failed += 1
        if body is None:
            absent.append((title, why))
        else:
            done.append((anchor, title, body))
    # overview first: what is here, what is not, and warnings that apply to the whole page
    labels = set()
    for key in ("latents", "metrics", "edits"):
        labels.update(_labels(ctx[key]))
    for m in manifests:
        met = (m.get("summary") or {}).get("metrics") if isinstance(m.get("summary"), dict) else None
        if isinstance(met, dict) and isinstance(met.get("backbones"), list):
            labels.update(str(x) for x in met["backbones"] if x)
    ov = []
    if not done:
        ov.append(H.banner(f"Nothing here yet: no committed runs, tables or training output under {root}.", "info"))
    ov.append(H.random_init_warning(sorted(labels)))
    ov.append(H.labels_line("Metric backbones", sorted(labels)))
    jobs = Counter(m.get("job") for m in manifests)
    tbl_rows = [(t, ctx[t].num_rows) for t in ("faces", "latents", "metrics", "edits") if ctx[t] is not None]
    ov.append(f"<p>Dataset root <code>{H.esc(root)}</code>: {len(manifests)} committed run(s)"
              + (" (" + ", ".join(f"{H.esc(j)}: {n}" for j, n in sorted(jobs.items(), key=str)) + ")" if jobs else "")
              + ".</p>")
    if tbl_rows:
        ov.append(H.table(["table", "rows (committed)"], tbl_rows, numeric=[False, True]))
    if absent:
        ov.append("<h3>Not found</h3><ul>" + "".join(f"<li>{H.esc(t)}: {H.esc(w)}</li>" for t, w in absent) + "</ul>")
    if notes:
        ov.append("<h3>Notes</h3><ul>" + "".join(f"<li>{H.esc(n)}</li>" for n in notes) + "</ul>")
    imgs = ctx["images"]
    if imgs.missing:
        ov.append(H.banner(f"{imgs.missing} image(s) referenced by the tables could not be read "
                           "(shown as placeholders).", "warn"))
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = rcfg.get("title") or f"Dataset report: {root}"
    html_text = H.page(title, f"generated {now}", [("overview", "Overview", "".join(ov))] + done)
    return html_text, {"runs": len(manifests), "sections": len(done) - failed, "failed": failed,
                       "missing": len(absent), "images": imgs.embedded, "missing_images": imgs.missing}


def run(cfg: dict) -> dict:
    if not cfg.get("input"):
        raise SystemExit("report: set input=URI (a dataset root written by the project's jobs)")
    t0 = time.time()
    root = cfg["input"].rstrip("/") or cfg["input"]
    rcfg = {**DEFAULTS["report"], **(cfg.get("report") or {})}
    html_text, info = build_report(root, rcfg)
    uri = storage.join(cfg.get("output") or root, "report", "index.html")
    storage.write_bytes(uri, html_text.encode("utf-8"))
    log.info("report: %d runs, %d sections, %d images embedded, %.1f KiB, %.1fs", info["runs"],
             info["sections"], info["images"], len(html_text) / 1024, time.time() - t0)
    print(f"report written to {uri}", file=sys.stderr, flush=True)
    # Counted per report part (jobs, faces, latents, metrics, edits, training), so the shared
    # accounting rule in = ok + failed + skipped holds: ok = built, failed = could not be built,
    # skipped = absent from the dataset. The number of committed runs read is `runs`.
    counts = {"in": len(SECTIONS), "ok": info["sections"], "failed": info["failed"], "skipped": info["missing"]}
    return {"run_id": None, "counts": counts,
            "extra": {"report": uri, "runs": info["runs"], "images": info["images"],
                      "missing_images": info["missing_images"]}}


if __name__ == "__main__":
    main(JOB, __doc__, DEFAULTS, run, use_ray=False)
