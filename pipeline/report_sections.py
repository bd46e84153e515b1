"""The sections of the dataset report (`jobs.report`), built from the committed Delta snapshots
and the Delta log through `pipeline.report_data`, rendered with `pipeline.report_html`.

    html, info = build_report(root, rcfg)

Each section reads only the columns it shows (scalars: floats and strings per row), takes a
bounded `head` of rows for thumbnails and failure lists, and never the W+ codes themselves (their
per-layer norms are summed batch by batch). A section that fails becomes an error banner in its
place; the others are still built.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
from collections import Counter, OrderedDict
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import delta, storage
from pipeline import report_html as H
from pipeline.redact import redact_uri
from pipeline.report_data import (Images, JobRunInfo, Snapshot, job_runs, open_snapshot, read_records,
                                  uncommitted_runs, where, wplus_norms_ray, wplus_norms_sample)

log = logging.getLogger("stbatch.report")

METRICS = ("psnr", "lpips", "id_similarity", "mse")
TRAIN_KEYS = ("loss", "l2", "lpips", "id", "wnorm")
ROW_TABLES = ("faces", "latents", "metrics", "edits")

DEFAULTS = {
    "title": None,            # page title (default: "Dataset report: <input>")
    "max_images": 16,         # crops / input|reconstruction pairs / edited faces shown
    "max_edits_per_image": 8,
    "thumb_px": 128,          # longer side of embedded thumbnails
    "thumb_format": "png",    # png | jpeg (smaller)
    "max_failed": 50,         # failed inputs listed with their error text
    "max_wplus_rows": 2000,   # ok W+ codes streamed for the per-layer norm plot; null or 0: every
                              # committed code, in Ray Data (starts a local Ray if none is running)
    "bins": 20,
    "max_train_grids": 3,     # newest train/grids/*.png embedded
    "grid_px": 768,
}


# ---------------------------------------------------------------------------------------------
# Small helpers


def _col(t: pa.Table | None, name: str) -> list:
    if t is None:
        return []
    return t[name].to_pylist() if name in t.column_names else [None] * t.num_rows


def _floats(t: pa.Table | None, name: str) -> np.ndarray:
    """The finite values of a numeric column (nulls and NaN dropped)."""
    if t is None or name not in t.column_names:
        return np.zeros(0)
    c = t[name]
    if not (pa.types.is_floating(c.type) or pa.types.is_integer(c.type)):
        return H.finite(c.to_pylist())
    v = np.asarray(pc.drop_null(c).to_numpy(), dtype=np.float64)
    return v[np.isfinite(v)]


def _exists(uri: str) -> bool:
    try:
        fs, path = storage.url_to_fs(uri)
        return fs.exists(path)
    except Exception:  # noqa: BLE001
        return False


def _status_table(counts: Counter) -> str:
    rows = sorted(counts.items(), key=lambda kv: (kv[0] != "ok", -kv[1], kv[0]))
    return H.table(["status", "rows"], rows, numeric=[False, True])


def _failed_list(snap: Snapshot, max_n: int, key_col: str) -> str:
    flt = where(snap.names, not_status=("ok", "duplicate"))
    n = snap.count(flt)
    if not n:
        return ""
    shown = snap.head(max_n, [key_col, "image_id", "status", "error"], flt).to_pylist()
    body = H.table([key_col, "status", "error"],
                   [(H.esc(r.get(key_col) or r.get("image_id")), H.esc(r.get("status")),
                     f'<pre class="err">{H.esc(r.get("error") or "")}</pre>') for r in shown], raw=True)
    more = H.missing(f"... and {n - len(shown)} more") if n > len(shown) else ""
    return f"<h3>Failed ({n})</h3>{body}{more}"


def _histograms(t: pa.Table, bins: int) -> str:
    items = [H.svg_histogram(_floats(t, m), m, bins=bins, color=H.PALETTE[i % len(H.PALETTE)])
             for i, m in enumerate(METRICS) if _floats(t, m).size]
    return H.charts(items) if items else H.missing("no reconstruction metrics in this table")


def _metric_summary_table(t: pa.Table) -> str:
    rows = []
    for m in METRICS:
        v = _floats(t, m)
        if v.size:
            rows.append((m, v.size, v.mean(), np.percentile(v, 50), np.percentile(v, 95), v.min(), v.max()))
    return H.table(["metric", "n", "mean", "p50", "p95", "min", "max"], rows,
                   numeric=[False] + [True] * 6) if rows else ""


def _pairs(ctx: dict, snap: Snapshot, with_metrics: bool) -> str:
    """Input | reconstruction for the first ok rows with a reconstruction."""
    cfg, imgs = ctx["cfg"], ctx["images"]
    flt = where(snap.names, status="ok", nonnull=("reconstruction_uri",))
    n = snap.count(flt)
    if not n:
        return ""
    shown = snap.head(cfg["max_images"], ["image_id", "face_index", "aligned_uri", "reconstruction_uri", *METRICS],
                      flt).to_pylist()
    out = [f"<h3>Input | reconstruction (first {len(shown)} of {n})</h3>"]
    for r in shown:
        metr = "  ".join(f"{m}={H.fmt(r.get(m), 3)}" for m in METRICS if H.to_float(r.get(m)) is not None)
        cells = [imgs.cell(r.get("aligned_uri"), "input"),
                 imgs.cell(r.get("reconstruction_uri"), "reconstruction", title=metr if with_metrics else "")]
        out.append(H.pair_row(str(r.get("image_id") or "")[:10], cells,
                              title=f"{r.get('image_id')} face {r.get('face_index')}\n{metr}" if with_metrics else ""))
    return "".join(out)


def _photo_pairs(ctx: dict, snap: Snapshot, crops: tuple[tuple[str, str], ...]) -> str:
    """Whole photos, before | after (the paste-back composite), beside the row's crops (`crops`:
    (column, caption) pairs), for the first ok rows with a composite. The photo is the row's
    `source_uri`, else the faces / latents tables' for its image_id."""
    cfg, imgs = ctx["cfg"], ctx["images"]
    flt = where(snap.names, status="ok", nonnull=("composite_uri",))
    n = snap.count(flt)
    if not n:
        return ""
    shown = snap.head(cfg["max_images"], ["image_id", "face_index", "source_uri", "composite_uri", "psnr_box",
                                          "psnr_outside", *(c for c, _ in crops)], flt).to_pylist()
    photos = _known_photos(ctx, sorted({r["image_id"] for r in shown if r.get("image_id") and not r.get("source_uri")}))
    px = 2 * int(cfg["thumb_px"])
    out = [f"<h3>Whole photos: before | after (first {len(shown)} of {n} composites)</h3>"]
    for r in shown:
        tip = "  ".join(f"{m}={H.fmt(r.get(m), 4)}" for m in ("psnr_box", "psnr_outside") if r.get(m) is not None)
        cells = [imgs.cell(r.get(c), cap) for c, cap in crops]
        cells += [imgs.cell(r.get("source_uri") or photos.get(r.get("image_id")), "photo", px=px),
                  imgs.cell(r.get("composite_uri"), "composite", title=tip, px=px)]
        out.append(H.pair_row(str(r.get("image_id") or "")[:10], cells,
                              title=f"{r.get('image_id')} face {r.get('face_index')}\n{tip}"))
    return "".join(out)


def _mean(v: np.ndarray) -> float | None:
    return float(v.mean()) if v.size else None


# ---------------------------------------------------------------------------------------------
# Sections: each returns body HTML, or None when its part of the dataset is absent


def _accounting(r: JobRunInfo) -> tuple[str, bool]:
    """(flag HTML, breaks the rule) for one run."""
    s = r.summary
    n = {k: s.get(k) for k in ("in", "ok", "failed", "skipped")}
    try:
        mismatch = all(v is not None for v in n.values()) and \
            int(n["in"]) != int(n["ok"]) + int(n["failed"]) + int(n["skipped"])
    except (TypeError, ValueError):
        mismatch = True
    if mismatch:
        return '<span class="flag">MISMATCH: in != ok + failed + skipped</span>', True
    return ("incomplete counts" if any(v is None for v in n.values()) else "ok"), False


def section_jobs(ctx: dict) -> str | None:
    runs: list[JobRunInfo] = ctx["runs"]
    if not runs:
        return None
    rows, classes = [], []
    bad = 0
    ghosts = []
    for r in runs:
        n = {k: r.summary.get(k) for k in ("in", "ok", "failed", "skipped")}
        tables = ", ".join(f"{t}@{v}" for t, v in sorted(r.commits.items())) or (
            "—" if r.state == "record only" else "")
        if not r.counted:
            why = ("old manifest format: its files are not in the Delta tables" if r.legacy else
                   "no Delta commit of " + ", ".join(r.missing))
            flag = f'<span class="flag">NOT COMMITTED: {H.esc(why)}</span>'
            cls = "uncommitted"
            ghosts.append(r.run_id)
        else:
            flag, mismatch = _accounting(r)
            if r.state == "partial":
                flag += f' <span class="flag">PARTIAL: no Delta commit of {H.esc(", ".join(r.missing))}</span>'
            if r.record is None:
                flag += " (no run record)"
            if r.unverifiable:
                flag += f" (log of {H.esc(', '.join(r.unverifiable))} expired: not verified)"
            bad += mismatch
            cls = "mismatch" if mismatch else ""
        rows.append([H.esc(r.job), H.esc(r.run_id), H.esc(r.started), H.esc(r.finished)]
                    + [H.fmt(n[k]) for k in ("in", "ok", "failed", "skipped")]
                    + [H.fmt(r.summary.get("seconds")), H.esc(tables), flag])
        classes.append(cls)
    head = ["job", "run_id", "started", "finished", "in", "ok", "failed", "skipped", "seconds", "tables (version)",
            "accounting"]
    out = [H.table(head, rows, classes, numeric=[False] * 4 + [True] * 5 + [False, False], raw=True)]
    if ghosts:
        out.insert(0, H.banner(f"{len(ghosts)} run record(s) without a Delta commit (not committed: their rows are "
                               "not in any table and they are not counted): " + ", ".join(ghosts[:5])
                               + (" ..." if len(ghosts) > 5 else ""), "warn"))
    if bad:
        out.insert(0, H.banner(f"{bad} run(s) break the accounting rule in = ok + failed + skipped.", "error"))
    # per-run metric summaries recorded by committed runs
    mrows = []
    for r in runs:
        met = r.summary.get("metrics")
        if not r.counted or not isinstance(met, dict):
            continue
        for k, v in met.items():
            if isinstance(v, dict):
                mrows.append((r.job, r.run_id, k, v.get("mean"), v.get("p50"), v.get("p95"), v.get("n")))
    if mrows:
        out.append("<h3>Metric summaries recorded by the runs</h3>")
        out.append(H.table(["job", "run_id", "metric", "mean", "p50", "p95", "n"], mrows,
                           numeric=[False] * 3 + [True] * 4))
    return "".join(out)


def section_faces(ctx: dict) -> str | None:
    snap: Snapshot | None = ctx["snaps"].get("faces")
    if snap is None:
        return None
    cfg = ctx["cfg"]
    out = [f"<p>{snap.rows} rows (version {snap.version}, {snap.files} data files).</p>",
           _status_table(snap.value_counts("status"))]
    flt = where(snap.names, status="ok", nonnull=("aligned_uri",))
    n_ok = snap.count(flt)
    if n_ok:
        shown = snap.head(cfg["max_images"], ["image_id", "det_score", "aligned_uri", "source_uri"], flt).to_pylist()
        out.append(f"<h3>Aligned crops (first {len(shown)} of {n_ok})</h3>")
        cells = []
        for r in shown:
            cap = f"{str(r.get('image_id') or '')[:10]}"
            if H.to_float(r.get("det_score")) is not None:
                cap += f" s={r['det_score']:.2f}"
            cells.append(ctx["images"].cell(r["aligned_uri"], cap, title=r.get("source_uri") or ""))
        out.append(H.grid(cells))
    else:
        out.append(H.missing("no aligned crops (no row with status ok)"))
    det = _floats(snap.read(["det_score"]), "det_score")
    if det.size:
        out.append(H.charts([H.svg_histogram(det, "det_score", bins=cfg["bins"])]))
    out.append(_failed_list(snap, cfg["max_failed"], "source_uri"))
    return "".join(out)


def _wplus_norms(ctx: dict, snap: Snapshot) -> str:
    """Mean +- std of ||w_l|| per W+ layer over the ok codes (a bounded sample, or all in Ray)."""
    if not snap.has("w_plus"):
        return H.missing("the latents table has no w_plus column")
    cap = ctx["cfg"].get("max_wplus_rows")
    if cap:
        sums = wplus_norms_sample(snap, int(cap))
        scope = "first"
    else:
        from jobs.cli import init_ray

        init_ray({"progress": False, **(ctx.get("ray_cfg") or {})})
        sums = wplus_norms_ray(snap)
        scope = "all"
    if not sums.total():
        return H.missing("no W+ codes to plot")
    shape, (n, s1, s2) = max(sums.by_shape.items(), key=lambda kv: kv[1][0])
    others = sum(a[0] for k, a in sums.by_shape.items() if k != shape)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0))
    out = [H.svg_bar_chart(mean, [str(i) for i in range(len(mean))],
                           f"mean ||w_l|| per W+ layer (n={n})", ylabel="L2 norm", xlabel="layer l",
                           errors=std, width=max(360, 24 * len(mean) + 80))]
    note = (f"{scope} {n} ok codes of shape {shape[0]}x{shape[1]}" if scope == "all" else
            f"the first {n} ok codes of shape {shape[0]}x{shape[1]} (report.max_wplus_rows={cap}; "
            "null = every code, in Ray Data)")
    if others:
        note += f"; {others} codes of other shapes (another model) left out"
    out.append(H.missing(note))
    return "".join(out)


def section_latents(ctx: dict) -> str | None:
    snap: Snapshot | None = ctx["snaps"].get("latents")
    if snap is None:
        return None
    cfg = ctx["cfg"]
    out = [f"<p>{snap.rows} rows (version {snap.version}, {snap.files} data files).</p>"]
    labels = ctx["labels"].get("latents", [])
    out.append(H.random_init_warning(labels))
    out.append(H.labels_line("Metric backbones", labels) if labels else "")
    models = {k: v for k, v in snap.group_counts(["model", "checkpoint_sha256"]).items() if k[0]}
    if models:
        out.append(H.table(["model", "checkpoint sha256", "rows"],
                           [(a, (b or "")[:12], n) for (a, b), n in sorted(models.items(), key=str)],
                           numeric=[False, False, True]))
    out.append(_status_table(snap.value_counts("status")))
    pairs = _pairs(ctx, snap, with_metrics=True)
    out.append(pairs or H.missing("no reconstructions (run jobs.invert with metrics=true, or jobs.evaluate)"))
    out.append(_photo_pairs(ctx, snap, (("aligned_uri", "input"), ("reconstruction_uri", "reconstruction"))))
    metrics = snap.read(METRICS)
    out.append("<h3>Reconstruction metrics</h3>")
    out.append(_metric_summary_table(metrics))
    out.append(_histograms(metrics, cfg["bins"]))
    out.append("<h3>W+ codes</h3>")
    out.append(_wplus_norms(ctx, snap))
    out.append(_failed_list(snap, cfg["max_failed"], "aligned_uri"))
    return "".join(out)


def section_metrics(ctx: dict) -> str | None:
    snap: Snapshot | None = ctx["snaps"].get("metrics")
    if snap is None:
        return None
    cfg = ctx["cfg"]
    labels = ctx["labels"].get("metrics", [])
    metrics = snap.read(METRICS)
    out = [f"<p>{snap.rows} rows (version {snap.version}, {snap.files} data files).</p>",
           H.random_init_warning(labels), H.labels_line("Metric backbones", labels) if labels else "",
           _status_table(snap.value_counts("status")), _metric_summary_table(metrics),
           _histograms(metrics, cfg["bins"])]
    lat = ctx["snaps"].get("latents")
    if lat is None or not lat.count(where(lat.names, nonnull=("reconstruction_uri",))):
        out.append(_pairs(ctx, snap, with_metrics=False))
    out.append(_failed_list(snap, cfg["max_failed"], "image_id"))
    return "".join(out)


EDIT_COLUMNS = ["edit_id", "image_id", "face_index", "kind", "attribute", "strength", "target",
                "reference_image_id", "status", "error", "output_uri", "source_uri", "aligned_uri", "input_uri",
                "logit_before", "logit_after", "id_similarity", "lpips"]


def _first_groups(snap: Snapshot, column: str, n: int) -> tuple[list, int]:
    """The first `n` distinct values of a column in file order, and how many there are."""
    first: list = []
    seen: set = set()
    for b in snap.ds.to_batches(columns=[column]):
        for v in pc.unique(b.column(0)).to_pylist():
            if v is None or v in seen:
                continue
            seen.add(v)
            if len(first) < n:
                first.append(v)
    return first, len(seen)


def _known_sources(ctx: dict, ids: list) -> dict[str, str]:
    """Aligned crops of these image ids in the faces / latents tables (bounded by `ids`)."""
    known: dict[str, str] = {}
    for name in ("faces", "latents"):
        snap = ctx["snaps"].get(name)
        if snap is None or not ids or not (snap.has("image_id") and snap.has("aligned_uri")):
            continue
        t = snap.read(["image_id", "aligned_uri"], pc.field("image_id").isin(ids) & pc.field("aligned_uri").is_valid())
        for iid, uri in zip(_col(t, "image_id"), _col(t, "aligned_uri")):
            known.setdefault(iid, uri)
    return known


def _known_photos(ctx: dict, ids: list) -> dict[str, str]:
    """The source photos of these image ids in the faces / latents tables (bounded by `ids`)."""
    known: dict[str, str] = {}
    for name in ("faces", "latents"):
        snap = ctx["snaps"].get(name)
        if snap is None or not ids or not (snap.has("image_id") and snap.has("source_uri")):
            continue
        t = snap.read(["image_id", "source_uri"], pc.field("image_id").isin(ids) & pc.field("source_uri").is_valid())
        for iid, uri in zip(_col(t, "image_id"), _col(t, "source_uri")):
            known.setdefault(iid, uri)
    return known


def _edit_summary(snap: Snapshot) -> str:
    """Attribute x kind: rows, ok rows, and means over the ok rows (Arrow group-by)."""
    t = snap.read(["attribute", "kind", "status", "strength", "logit_before", "logit_after", "id_similarity",
                   "lpips"])
    n = t.num_rows

    def col(name, typ=pa.float64()):
        return t[name].cast(typ) if name in t.column_names else pa.nulls(n, typ)

    ok = pc.fill_null(pc.equal(col("status", pa.string()), "ok"), False) if "status" in t.column_names else \
        pa.array(np.ones(n, dtype=bool))
    keyed = pa.table({
        "attribute": pc.fill_null(col("attribute", pa.string()), "—"),
        "kind": pc.fill_null(col("kind", pa.string()), "—"),
        "ok": pc.cast(ok, pa.int64()),
        **{k: pc.if_else(ok, v, pa.scalar(None, pa.float64())) for k, v in (
            ("strength", col("strength")), ("dlogit", pc.subtract(col("logit_after"), col("logit_before"))),
            ("id", col("id_similarity")), ("lpips", col("lpips")))}})
    g = keyed.group_by(["attribute", "kind"]).aggregate(
        [([], "count_all"), ("ok", "sum"), ("strength", "mean"), ("dlogit", "mean"), ("id", "mean"),
         ("lpips", "mean")])
    rows = sorted((r["attribute"], r["kind"], r["count_all"], r["ok_sum"], r["strength_mean"], r["dlogit_mean"],
                   r["id_mean"], r["lpips_mean"]) for r in g.to_pylist())
    return ("<h3>By attribute and kind (ok rows)</h3>"
            + H.table(["attribute", "kind", "rows", "ok", "mean strength", "mean logit change",
                       "mean ID similarity", "mean LPIPS"], rows, numeric=[False, False] + [True] * 6))


def section_edits(ctx: dict) -> str | None:
    snap: Snapshot | None = ctx["snaps"].get("edits")
    if snap is None:
        return None
    cfg, imgs = ctx["cfg"], ctx["images"]
    has = snap.names
    out = [f"<p>{snap.rows} rows (version {snap.version}, {snap.files} data files).</p>"]
    if "status" in has:
        out.append(_status_table(snap.value_counts("status")))
    labels = ctx["labels"].get("edits", [])
    out.append(H.random_init_warning(labels))
    out.append(H.labels_line("Metric backbones", labels) if labels else "")
    if "output_uri" in has:
        if "image_id" in has:
            ids, n_faces = _first_groups(snap, "image_id", int(cfg["max_images"]))
            rows = snap.read(EDIT_COLUMNS, pc.field("image_id").isin(ids)).to_pylist() if ids else []
        else:
            rows = snap.head(int(cfg["max_images"]), EDIT_COLUMNS).to_pylist()
            ids, n_faces = [None], 1
        groups: OrderedDict = OrderedDict((i, []) for i in ids)
        for r in rows:
            groups.setdefault(r.get("image_id"), []).append(r)
        known = _known_sources(ctx, [i for i in ids if i])
        if groups:
            out.append(f"<h3>Input | edits (first {len(groups)} of {n_faces} faces)</h3>")
        for iid, grp in groups.items():
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
            out.append(H.pair_row(str(iid or "")[:10], cells, title=str(iid)))
    else:
        out.append(H.missing("the edits table has no output_uri column: no images to show"))
    out.append(_photo_pairs(ctx, snap, (("source_reconstruction_uri", "source"), ("output_uri", "edit"))))
    out.append(_edit_summary(snap))
    scores = snap.read(["id_similarity", "lpips"])
    hist = [H.svg_histogram(_floats(scores, c), c, bins=cfg["bins"]) for c in ("id_similarity", "lpips")
            if _floats(scores, c).size]
    if hist:
        out.append(H.charts(hist))
    out.append(_failed_list(snap, cfg["max_failed"], "edit_id" if "edit_id" in has else "image_id"))
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
    ("jobs", "Jobs", section_jobs, "no committed runs (Delta commits or _runs/*.json records)"),
    ("faces", "Faces (jobs.align)", section_faces, "no committed faces table (run jobs.align)"),
    ("latents", "Latents (jobs.invert)", section_latents, "no committed latents table (run jobs.invert)"),
    ("metrics", "Metrics (jobs.evaluate)", section_metrics, "no committed metrics table (run jobs.evaluate)"),
    ("edits", "Edits (jobs.edit)", section_edits, "no committed edits table (run jobs.edit)"),
    ("training", "Training (jobs.train_encoder)", section_training,
     "no train/log.jsonl, train/grids/ or train/eval.json (run jobs.train_encoder)"),
]


def _table_overview(snaps: dict[str, Snapshot], runs: list[JobRunInfo]) -> str:
    last: dict[str, tuple[int, str]] = {}
    for r in runs:
        for t, v in r.commits.items():
            if v >= last.get(t, (-1, ""))[0]:
                last[t] = (v, f"{r.job} {r.run_id}")
    rows = [(name, s.version, s.files, s.rows, last.get(name, (0, "—"))[1]) for name, s in sorted(snaps.items())]
    return H.table(["table", "version", "data files", "rows (committed)", "last run"], rows,
                   numeric=[False, True, True, True, False])


def build_report(root: str, rcfg: dict, ray_cfg: dict | None = None) -> tuple[str, dict]:
    """The HTML of the report for dataset `root`, and counts {runs, sections, failed, missing,
    images, missing_images}. `ray_cfg` ({"ray": ..., "progress": ...} of the job's config) is
    used only when the W+ norms are computed over every code in Ray Data."""
    rcfg = {**DEFAULTS, **(rcfg or {})}
    notes: list[str] = []
    try:
        tables = delta.list_tables(root)
    except Exception as e:  # noqa: BLE001
        notes.append(f"tables under the root could not be listed: {e}")
        tables = []
    records = read_records(root, notes)
    runs = job_runs(root, tables, records, notes)
    snaps = {t: s for t in tables if (s := open_snapshot(root, t, notes)) is not None}
    ctx = {"root": root, "cfg": rcfg, "notes": notes, "runs": runs, "snaps": snaps, "labels": {}, "ray_cfg": ray_cfg,
           "images": Images(root, [m.get("output") for m in records], rcfg["thumb_px"], rcfg["thumb_format"])}
    for t in ROW_TABLES:
        if t not in snaps:
            continue
        try:
            ctx["labels"][t] = snaps[t].distinct("metric_backbones")
        except Exception as e:  # noqa: BLE001
            notes.append(f"{t}: metric_backbones unreadable: {e}")
        committed = {r.run_id for r in runs if t in r.commits}
        stale = uncommitted_runs(root, t, committed)
        if stale:
            notes.append(f"{t}: ignored the data files of {len(stale)} uncommitted run(s) (no Delta commit names "
                         "them: killed, or still writing; python -m jobs.maintain vacuums them): "
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
    counted = [r for r in runs if r.counted]
    labels = set()
    for v in ctx["labels"].values():
        labels.update(v)
    for r in counted:
        met = r.summary.get("metrics")
        if isinstance(met, dict) and isinstance(met.get("backbones"), list):
            labels.update(str(x) for x in met["backbones"] if x)
    shown_root = redact_uri(root)
    ov = []
    if not done:
        ov.append(H.banner(f"Nothing here yet: no committed runs, tables or training output under {shown_root}.",
                           "info"))
    ov.append(H.random_init_warning(sorted(labels)))
    ov.append(H.labels_line("Metric backbones", sorted(labels)))
    jobs = Counter(r.job for r in counted)
    ov.append(f"<p>Dataset root <code>{H.esc(shown_root)}</code>: {len(counted)} committed run(s)"
              + (" (" + ", ".join(f"{H.esc(j)}: {n}" for j, n in sorted(jobs.items(), key=str)) + ")" if jobs else "")
              + ".</p>")
    if snaps:
        ov.append(_table_overview(snaps, runs))
    if absent:
        ov.append("<h3>Not found</h3><ul>" + "".join(f"<li>{H.esc(t)}: {H.esc(w)}</li>" for t, w in absent) + "</ul>")
    if notes:
        ov.append("<h3>Notes</h3><ul>" + "".join(f"<li>{H.esc(n)}</li>" for n in notes) + "</ul>")
    imgs = ctx["images"]
    if imgs.missing:
        ov.append(H.banner(f"{imgs.missing} image(s) referenced by the tables could not be read "
                           "(shown as placeholders).", "warn"))
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = rcfg.get("title") or f"Dataset report: {shown_root}"
    html_text = H.page(title, f"generated {now}", [("overview", "Overview", "".join(ov))] + done)
    return html_text, {"runs": len(counted), "sections": len(done) - failed, "failed": failed,
                       "missing": len(absent), "images": imgs.embedded, "missing_images": imgs.missing}
