"""The sections of the dataset report as data: each builder reads what its part of the dataset
holds (through `pipeline.report_data`) and returns `pipeline.report_blocks` blocks, or None when
that part is absent. No markup here: the templates render the blocks (`pipeline.report_page`).

Each section reads only the columns it shows (scalars: floats and strings per row), takes a
bounded `head` of rows for thumbnails and failure lists, and never the W+ codes themselves (their
per-layer norms are summed batch by batch).
"""
from __future__ import annotations

import datetime as _dt
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.report_blocks import Banner, Charts, Flag, Grid, Heading, ImageRow, Items, Labels, Note, Para, Pre, Table
from pipeline.report_charts import PALETTE, BarChart, Histogram, LineChart
from pipeline.report_data import JobRunInfo, Snapshot, where, wplus_norms_ray, wplus_norms_sample
from pipeline.report_format import finite, fmt, to_float
from pipeline.report_images import Images, Thumb
from pipeline.sections import ReportSection

METRICS = ("psnr", "lpips", "id_similarity", "mse")
TRAIN_KEYS = ("loss", "l2", "lpips", "id", "wnorm")


@dataclass
class Context:
    """What every section may read: the dataset root, the report settings, the committed snapshots and
    runs, the image cache, the notes the overview lists, and how to start Ray when a section
    needs it (the caller's: the report job knows the job's Ray settings)."""
    root: str
    cfg: ReportSection
    runs: list[JobRunInfo]
    snaps: dict[str, Snapshot]
    images: Images
    notes: list[str] = field(default_factory=list)
    labels: dict[str, list[str]] = field(default_factory=dict)
    start_ray: Callable[[], None] | None = None


# ---------------------------------------------------------------------------------------------
# Pieces shared by sections


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
        return finite(c.to_pylist())
    v = np.asarray(pc.drop_null(c).to_numpy(), dtype=np.float64)
    return v[np.isfinite(v)]


def _exists(uri: str) -> bool:
    try:
        fs, path = storage.url_to_fs(uri)
        return fs.exists(path)
    except Exception:  # noqa: BLE001
        return False


def random_init_banner(labels) -> Banner | None:
    """The warning shown when any metric-backbone label says RANDOM-INIT."""
    bad = [x for x in labels if x and "RANDOM-INIT" in str(x).upper()]
    if not bad:
        return None
    return Banner("Warning: LPIPS / ID similarity numbers here come from RANDOM-INIT metric backbones "
                  "(test mode). They are not real LPIPS or identity metrics; do not compare them with "
                  "published numbers. Backbones: " + "; ".join(sorted(set(map(str, bad)))), "error")


def _backbones(labels: list[str]) -> list:
    return [random_init_banner(labels), Labels("Metric backbones", labels) if labels else None]


def _status_table(counts: Counter) -> Table:
    rows = sorted(counts.items(), key=lambda kv: (kv[0] != "ok", -kv[1], kv[0]))
    return Table(["status", "rows"], rows, numeric=[False, True])


def _rows_line(snap: Snapshot) -> Para:
    return Para(f"{snap.rows} rows (version {snap.version}, {snap.files} data files).")


def _failed_list(snap: Snapshot, max_n: int, key_col: str) -> list:
    flt = where(snap.names, not_status=("ok", "duplicate"))
    n = snap.count(flt)
    if not n:
        return []
    shown = snap.head(max_n, [key_col, "image_id", "status", "error"], flt).to_pylist()
    out = [Heading(f"Failed ({n})"),
           Table([key_col, "status", "error"],
                 [(r.get(key_col) or r.get("image_id"), r.get("status"), Pre(r.get("error") or "")) for r in shown])]
    if n > len(shown):
        out.append(Note(f"... and {n - len(shown)} more"))
    return out


def _histograms(t: pa.Table, bins: int) -> Charts | Note:
    items = [Histogram(_floats(t, m), m, bins=bins, color=PALETTE[i % len(PALETTE)])
             for i, m in enumerate(METRICS) if _floats(t, m).size]
    return Charts(items) if items else Note("no reconstruction metrics in this table")


def _metric_summary_table(t: pa.Table) -> Table | None:
    rows = []
    for m in METRICS:
        v = _floats(t, m)
        if v.size:
            rows.append((m, v.size, v.mean(), np.percentile(v, 50), np.percentile(v, 95), v.min(), v.max()))
    return Table(["metric", "n", "mean", "p50", "p95", "min", "max"], rows,
                 numeric=[False] + [True] * 6) if rows else None


def _metrics_tip(r: dict, names, digits: int) -> str:
    return "  ".join(f"{m}={fmt(r.get(m), digits)}" for m in names if to_float(r.get(m)) is not None)


def _pairs(ctx: Context, snap: Snapshot, with_metrics: bool) -> list:
    """Input | reconstruction for the first ok rows with a reconstruction."""
    flt = where(snap.names, status="ok", nonnull=("reconstruction_uri",))
    n = snap.count(flt)
    if not n:
        return []
    shown = snap.head(ctx.cfg.max_images, ["image_id", "face_index", "aligned_uri", "reconstruction_uri",
                                              *METRICS], flt).to_pylist()
    out: list = [Heading(f"Input | reconstruction (first {len(shown)} of {n})")]
    for r in shown:
        metr = _metrics_tip(r, METRICS, 3) if with_metrics else ""
        thumbs = [ctx.images.thumb(r.get("aligned_uri"), "input"),
                  ctx.images.thumb(r.get("reconstruction_uri"), "reconstruction", title=metr)]
        out.append(ImageRow(str(r.get("image_id") or "")[:10], thumbs,
                            title=f"{r.get('image_id')} face {r.get('face_index')}\n{metr}" if with_metrics else ""))
    return out


def _photo_pairs(ctx: Context, snap: Snapshot, crops: tuple[tuple[str, str], ...]) -> list:
    """Whole photos, before | after (the paste-back composite), beside the row's crops (`crops`:
    (column, caption) pairs), for the first ok rows with a composite. The photo is the row's
    `source_uri`, else the faces / latents tables' for its image_id."""
    flt = where(snap.names, status="ok", nonnull=("composite_uri",))
    n = snap.count(flt)
    if not n:
        return []
    shown = snap.head(ctx.cfg.max_images, ["image_id", "face_index", "source_uri", "composite_uri", "psnr_box",
                                              "psnr_outside", *(c for c, _ in crops)], flt).to_pylist()
    photos = _known(ctx, sorted({r["image_id"] for r in shown if r.get("image_id") and not r.get("source_uri")}),
                    "source_uri")
    px = 2 * ctx.cfg.thumb_px
    out: list = [Heading(f"Whole photos: before | after (first {len(shown)} of {n} composites)")]
    for r in shown:
        tip = _metrics_tip(r, ("psnr_box", "psnr_outside"), 4)
        thumbs = [ctx.images.thumb(r.get(c), cap) for c, cap in crops]
        thumbs += [ctx.images.thumb(r.get("source_uri") or photos.get(r.get("image_id")), "photo (before)", px=px),
                   ctx.images.thumb(r.get("composite_uri"), "composite (after)", title=tip, px=px)]
        out.append(ImageRow(str(r.get("image_id") or "")[:10], thumbs,
                            title=f"{r.get('image_id')} face {r.get('face_index')}\n{tip}"))
    return out


def _known(ctx: Context, ids: list, column: str) -> dict[str, str]:
    """`column` (aligned_uri, source_uri) of these image ids in the faces / latents tables
    (bounded by `ids`)."""
    known: dict[str, str] = {}
    for name in ("faces", "latents"):
        snap = ctx.snaps.get(name)
        if snap is None or not ids or not (snap.has("image_id") and snap.has(column)):
            continue
        t = snap.read(["image_id", column], pc.field("image_id").isin(ids) & pc.field(column).is_valid())
        for iid, uri in zip(_col(t, "image_id"), _col(t, column)):
            known.setdefault(iid, uri)
    return known


# ---------------------------------------------------------------------------------------------
# Jobs


def _accounting(r: JobRunInfo) -> tuple[list, bool]:
    """(accounting cell pieces, breaks the rule) for one run."""
    s = r.summary
    keys = ("in", "ok", "failed", "skipped")
    n = {k: v for k in keys if (v := s.get(k)) is not None}
    complete = len(n) == len(keys)
    try:
        mismatch = complete and int(n["in"]) != int(n["ok"]) + int(n["failed"]) + int(n["skipped"])
    except (TypeError, ValueError):
        mismatch = True
    if mismatch:
        return [Flag("MISMATCH: in != ok + failed + skipped")], True
    return ["ok" if complete else "incomplete counts"], False


def section_jobs(ctx: Context) -> list | None:
    if not ctx.runs:
        return None
    rows, classes, bad, ghosts = [], [], 0, []
    for r in ctx.runs:
        n = {k: r.summary.get(k) for k in ("in", "ok", "failed", "skipped")}
        tables = ", ".join(f"{t}@{v}" for t, v in sorted(r.commits.items())) or (
            "—" if r.state == "record only" else "")
        if not r.counted:
            why = ("old manifest format: its files are not in the Delta tables" if r.legacy else
                   "no Delta commit of " + ", ".join(r.missing))
            flag: list = [Flag(f"NOT COMMITTED: {why}")]
            cls = "uncommitted"
            ghosts.append(r.run_id)
        else:
            flag, mismatch = _accounting(r)
            if r.state == "partial":
                flag.append(Flag(f"PARTIAL: no Delta commit of {', '.join(r.missing)}"))
            if r.record is None:
                flag.append("(no run record)")
            if r.unverifiable:
                flag.append(f"(log of {', '.join(r.unverifiable)} expired: not verified)")
            bad += mismatch
            cls = "mismatch" if mismatch else ""
        rows.append([r.job, r.run_id, r.started, r.finished, *(n[k] for k in ("in", "ok", "failed", "skipped")),
                     r.summary.get("seconds"), tables, flag])
        classes.append(cls)
    head = ["job", "run_id", "started", "finished", "in", "ok", "failed", "skipped", "seconds", "tables (version)",
            "accounting"]
    out: list = []
    if bad:
        out.append(Banner(f"{bad} run(s) break the accounting rule in = ok + failed + skipped.", "error"))
    if ghosts:
        out.append(Banner(f"{len(ghosts)} run record(s) without a Delta commit (not committed: their rows are "
                          "not in any table and they are not counted): " + ", ".join(ghosts[:5])
                          + (" ..." if len(ghosts) > 5 else ""), "warn"))
    out.append(Table(head, rows, numeric=[False] * 4 + [True] * 5 + [False, False], row_classes=classes))
    mrows = []
    for r in ctx.runs:
        met = r.summary.get("metrics")
        if not r.counted or not isinstance(met, dict):
            continue
        for k, v in met.items():
            if isinstance(v, dict):
                mrows.append((r.job, r.run_id, k, v.get("mean"), v.get("p50"), v.get("p95"), v.get("n")))
    if mrows:
        out += [Heading("Metric summaries recorded by the runs"),
                Table(["job", "run_id", "metric", "mean", "p50", "p95", "n"], mrows, numeric=[False] * 3 + [True] * 4)]
    return out


# ---------------------------------------------------------------------------------------------
# Faces, latents, metrics


def section_faces(ctx: Context) -> list | None:
    snap = ctx.snaps.get("faces")
    if snap is None:
        return None
    cfg = ctx.cfg
    out: list = [_rows_line(snap), _status_table(snap.value_counts("status"))]
    flt = where(snap.names, status="ok", nonnull=("aligned_uri",))
    n_ok = snap.count(flt)
    if n_ok:
        shown = snap.head(cfg.max_images, ["image_id", "det_score", "aligned_uri", "source_uri"], flt).to_pylist()
        thumbs = []
        for r in shown:
            cap = str(r.get("image_id") or "")[:10]
            if to_float(r.get("det_score")) is not None:
                cap += f" s={r['det_score']:.2f}"
            thumbs.append(ctx.images.thumb(r["aligned_uri"], cap, title=r.get("source_uri") or ""))
        out += [Heading(f"Aligned crops (first {len(shown)} of {n_ok})"), Grid(thumbs)]
    else:
        out.append(Note("no aligned crops (no row with status ok)"))
    det = _floats(snap.read(["det_score"]), "det_score")
    if det.size:
        out.append(Charts([Histogram(det, "det_score", bins=cfg.bins)]))
    return out + _failed_list(snap, cfg.max_failed, "source_uri")


def _wplus_norms(ctx: Context, snap: Snapshot) -> list:
    """Mean +- std of ||w_l|| per W+ layer over the ok codes (a bounded sample, or all in Ray)."""
    if not snap.has("w_plus"):
        return [Note("the latents table has no w_plus column")]
    cap = ctx.cfg.max_wplus_rows
    if cap:
        sums = wplus_norms_sample(snap, cap)
    else:
        if ctx.start_ray is not None:
            ctx.start_ray()
        sums = wplus_norms_ray(snap)
    if not sums.total():
        return [Note("no W+ codes to plot")]
    shape, (n, s1, s2) = max(sums.by_shape.items(), key=lambda kv: kv[1][0])
    others = sum(a[0] for k, a in sums.by_shape.items() if k != shape)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0))
    chart = BarChart(mean, [str(i) for i in range(len(mean))], f"mean ||w_l|| per W+ layer (n={n})",
                     ylabel="L2 norm", xlabel="layer l", errors=std, width=max(360, 24 * len(mean) + 80))
    note = (f"all {n} ok codes of shape {shape[0]}x{shape[1]}" if not cap else
            f"the first {n} ok codes of shape {shape[0]}x{shape[1]} (report.max_wplus_rows={cap}; "
            "null = every code, in Ray Data)")
    if others:
        note += f"; {others} codes of other shapes (another model) left out"
    return [Charts([chart]), Note(note)]


def section_latents(ctx: Context) -> list | None:
    snap = ctx.snaps.get("latents")
    if snap is None:
        return None
    out: list = [_rows_line(snap), *_backbones(ctx.labels.get("latents", []))]
    models = {k: v for k, v in snap.group_counts(["model", "checkpoint_sha256"]).items() if k[0]}
    if models:
        out.append(Table(["model", "checkpoint sha256", "rows"],
                         [(a, (b or "")[:12], n) for (a, b), n in sorted(models.items(), key=str)],
                         numeric=[False, False, True]))
    out.append(_status_table(snap.value_counts("status")))
    out += _pairs(ctx, snap, with_metrics=True) or [
        Note("no reconstructions (run jobs.invert with metrics=true, or jobs.evaluate)")]
    out += _photo_pairs(ctx, snap, (("aligned_uri", "input"), ("reconstruction_uri", "reconstruction")))
    metrics = snap.read(METRICS)
    out += [Heading("Reconstruction metrics"), _metric_summary_table(metrics), _histograms(metrics, ctx.cfg.bins),
            Heading("W+ codes"), *_wplus_norms(ctx, snap)]
    return out + _failed_list(snap, ctx.cfg.max_failed, "aligned_uri")


def section_metrics(ctx: Context) -> list | None:
    snap = ctx.snaps.get("metrics")
    if snap is None:
        return None
    metrics = snap.read(METRICS)
    out: list = [_rows_line(snap), *_backbones(ctx.labels.get("metrics", [])),
                 _status_table(snap.value_counts("status")), _metric_summary_table(metrics),
                 _histograms(metrics, ctx.cfg.bins)]
    lat = ctx.snaps.get("latents")
    if lat is None or not lat.count(where(lat.names, nonnull=("reconstruction_uri",))):
        out += _pairs(ctx, snap, with_metrics=False)
    return out + _failed_list(snap, ctx.cfg.max_failed, "image_id")


# ---------------------------------------------------------------------------------------------
# Edits


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


def _edit_summary(snap: Snapshot) -> list:
    """Attribute x kind: rows, ok rows, and means over the ok rows (Arrow group-by)."""
    t = snap.read(["attribute", "kind", "status", "strength", "logit_before", "logit_after", "id_similarity",
                   "lpips"])
    n = t.num_rows

    def col(name: str, typ: pa.DataType | None = None) -> pa.Array | pa.ChunkedArray:
        typ = pa.float64() if typ is None else typ
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
    return [Heading("By attribute and kind (ok rows)"),
            Table(["attribute", "kind", "rows", "ok", "mean strength", "mean logit change", "mean ID similarity",
                   "mean LPIPS"], rows, numeric=[False, False] + [True] * 6)]


def _edit_thumb(ctx: Context, r: dict) -> Thumb:
    cap = _edit_caption(r)
    lb, la = to_float(r.get("logit_before")), to_float(r.get("logit_after"))
    tip = "  ".join(s for s in (
        f"logit {lb:.2f} -> {la:.2f}" if lb is not None and la is not None else "",
        _metrics_tip(r, ("id_similarity", "lpips"), 3),
        f"ref={r.get('reference_image_id')}" if r.get("reference_image_id") else "",
        f"{r.get('status')}: {r.get('error')}" if r.get("status") not in (None, "ok") else "") if s)
    if r.get("status") not in (None, "ok") and not r.get("output_uri"):
        return Thumb(None, cap or "edit", tip, ctx.cfg.thumb_px, str(r.get("status")))
    return ctx.images.thumb(r.get("output_uri"), cap or "edit", title=tip)


def _edit_caption(r: dict) -> str:
    """`attribute kind strength`; a label edit says which way (`label=1` adds, `label=0` removes)."""
    kind = r.get("kind")
    if kind == "label" and r.get("target") is not None:
        kind = f"label={r['target']}"
    cap = " ".join(str(x) for x in (r.get("attribute"), kind) if x)
    if to_float(r.get("strength")) is not None:
        cap += f" {float(r['strength']):+g}"
    return cap


def _edit_photos(ctx: Context, snap: Snapshot) -> list:
    """Whole photos, before | after: per edited face, its photo and the paste-back composite of
    each of its edits (the first `max_images` composites; with paste_back.group=photo, edits of
    one photo share a composite, shown once)."""
    flt = where(snap.names, status="ok", nonnull=("composite_uri",))
    n = snap.count(flt)
    if not n:
        return []
    shown = snap.head(ctx.cfg.max_images, ["image_id", "face_index", "source_uri", "composite_uri", "psnr_box",
                                              "psnr_outside", "attribute", "kind", "strength", "target"],
                      flt).to_pylist()
    groups: OrderedDict = OrderedDict()
    for r in shown:
        groups.setdefault((r.get("image_id"), r.get("face_index")), []).append(r)
    photos = _known(ctx, sorted({k[0] for k in groups if k[0]}), "source_uri")
    px = 3 * ctx.cfg.thumb_px // 2  # a photo and four edits side by side on a laptop's width
    out: list = [Heading(f"Whole photos: before | after (first {len(shown)} of {n} edits pasted back)")]
    for (iid, face), rows in groups.items():
        src = next((r["source_uri"] for r in rows if r.get("source_uri")), None) or photos.get(iid)
        thumbs = [ctx.images.thumb(src, "photo (before)", px=px)]
        seen: set = set()
        for r in rows:
            if r["composite_uri"] in seen:
                continue
            seen.add(r["composite_uri"])
            thumbs.append(ctx.images.thumb(r["composite_uri"], f"after: {_edit_caption(r)}",
                                           title=_metrics_tip(r, ("psnr_box", "psnr_outside"), 4), px=px))
        out.append(ImageRow(str(iid or "")[:10], thumbs, title=f"{iid} face {face}"))
    return out


def section_edits(ctx: Context) -> list | None:
    snap = ctx.snaps.get("edits")
    if snap is None:
        return None
    cfg = ctx.cfg
    out: list = [_rows_line(snap)]
    if snap.has("status"):
        out.append(_status_table(snap.value_counts("status")))
    out += _backbones(ctx.labels.get("edits", []))
    if snap.has("output_uri"):
        if snap.has("image_id"):
            ids, n_faces = _first_groups(snap, "image_id", cfg.max_images)
            rows = snap.read(EDIT_COLUMNS, pc.field("image_id").isin(ids)).to_pylist() if ids else []
        else:
            rows = snap.head(cfg.max_images, EDIT_COLUMNS).to_pylist()
            ids, n_faces = [None], 1
        groups: OrderedDict = OrderedDict((i, []) for i in ids)
        for r in rows:
            groups.setdefault(r.get("image_id"), []).append(r)
        known = _known(ctx, [i for i in ids if i], "aligned_uri")
        if groups:
            out.append(Heading(f"Input | edits (first {len(groups)} of {n_faces} faces)"))
        for iid, grp in groups.items():
            src = next((r.get(c) for r in grp for c in ("source_uri", "aligned_uri", "input_uri") if r.get(c)), None)
            thumbs = [ctx.images.thumb(src or known.get(iid), "input")]
            thumbs += [_edit_thumb(ctx, r) for r in grp[: cfg.max_edits_per_image]]
            more = len(grp) - cfg.max_edits_per_image
            out.append(ImageRow(str(iid or "")[:10], thumbs, title=str(iid), more=f"+{more} more" if more > 0 else ""))
    else:
        out.append(Note("the edits table has no output_uri column: no images to show"))
    out += _edit_photos(ctx, snap)
    out += _edit_summary(snap)
    scores = snap.read(["id_similarity", "lpips"])
    hist = [Histogram(_floats(scores, c), c, bins=cfg.bins) for c in ("id_similarity", "lpips")
            if _floats(scores, c).size]
    if hist:
        out.append(Charts(hist))
    return out + _failed_list(snap, cfg.max_failed, "edit_id" if snap.has("edit_id") else "image_id")


# ---------------------------------------------------------------------------------------------
# Training


def _read_log(uri: str) -> tuple[list[dict], int]:
    """The JSON records of a log.jsonl and the number of lines that are not one."""
    recs, bad = [], 0
    for line in storage.read_bytes(uri).decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(r, dict):
            recs.append(r)
        else:
            bad += 1
    return recs, bad


def _last(recs: list[dict], k: str):
    for r in reversed(recs):
        if to_float(r.get(k)) is not None:
            return r[k]
    return None


def _train_log(recs: list[dict], bad: int) -> list:
    xs = [r.get("step", i) for i, r in enumerate(recs)]
    keys = [k for k in TRAIN_KEYS if any(to_float(r.get(k)) is not None for r in recs)]
    keys += sorted({k for r in recs for k, v in r.items() if k not in TRAIN_KEYS and k not in
                    ("step", "seconds", "time", "epoch", "lr") and to_float(v) is not None})[:4]
    last = recs[-1]
    line = f"{len(recs)} log lines; last step {last.get('step', len(recs) - 1)}"
    if to_float(last.get("seconds")) is not None:
        line += f", {fmt(last.get('seconds'))} s"
    if bad:
        line += f", {bad} unparsable line(s) skipped"
    return [Para(line + "."),
            Table(["key", "first", "last", "min"],
                  [(k, _last(recs[::-1], k), _last(recs, k), finite([r.get(k) for r in recs]).min()) for k in keys],
                  numeric=[False, True, True, True]),
            Charts([LineChart({k: (xs, [r.get(k) for r in recs])}, k, xlabel="step") for k in keys])]


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


def _eval_table(ev) -> Table:
    """{"trained": {"psnr": ..}, "mean_latent": {...}} -> rows = variants, columns = metrics;
    anything else is shown flattened as key | value."""
    if isinstance(ev, dict) and ev and all(isinstance(v, dict) for v in ev.values()):
        flat = {name: _flatten(v) for name, v in ev.items()}
        cols = list(OrderedDict.fromkeys(k for f in flat.values() for k in f))
        rows = [[name] + [f.get(c) for c in cols] for name, f in flat.items()]
        num = [False] + [all(to_float(r[i + 1]) is not None or r[i + 1] is None for r in rows)
                         for i in range(len(cols))]
        return Table([""] + cols, rows, numeric=num)
    flat = _flatten(ev)
    return Table(["key", "value"], list(flat.items()),
                 numeric=[False, all(to_float(v) is not None for v in flat.values())])


def section_training(ctx: Context) -> list | None:
    root, cfg = ctx.root, ctx.cfg
    found = False
    out: list = []
    log_uri = storage.join(root, "train", "log.jsonl")
    if _exists(log_uri):
        found = True
        try:
            recs, bad = _read_log(log_uri)
            out += _train_log(recs, bad) if recs else [Note("train/log.jsonl has no records")]
        except Exception as e:  # noqa: BLE001
            out.append(Banner(f"train/log.jsonl unreadable: {e}", "error"))
    else:
        out.append(Note("no train/log.jsonl"))
    grids = _train_grids(root, ctx.notes)
    if grids:
        found = True
        shown = grids[: cfg.max_train_grids]
        out += [Heading(f"Training grids (newest {len(shown)} of {len(grids)})"),
                Grid([ctx.images.thumb(u, u.rsplit("/", 1)[-1], px=cfg.grid_px) for u in shown])]
    eval_uri = storage.join(root, "train", "eval.json")
    if _exists(eval_uri):
        found = True
        out.append(Heading("Evaluation (train/eval.json)"))
        try:
            out.append(_eval_table(json.loads(storage.read_bytes(eval_uri))))
        except Exception as e:  # noqa: BLE001
            out.append(Banner(f"train/eval.json unreadable: {e}", "error"))
    return out if found else None


# ---------------------------------------------------------------------------------------------


def section_analytics(ctx: Context) -> list | None:
    from pipeline.report_analytics import section_analytics as build  # it builds on this module's pieces

    return build(ctx)


SECTIONS: list[tuple[str, str, Callable[[Context], list | None], str]] = [
    ("jobs", "Jobs", section_jobs, "no committed runs (Delta commits or _runs/*.json records)"),
    ("faces", "Faces (jobs.align)", section_faces, "no committed faces table (run jobs.align)"),
    ("latents", "Latents (jobs.invert)", section_latents, "no committed latents table (run jobs.invert)"),
    ("metrics", "Metrics (jobs.evaluate)", section_metrics, "no committed metrics table (run jobs.evaluate)"),
    ("edits", "Edits (jobs.edit)", section_edits, "no committed edits table (run jobs.edit)"),
    ("analytics", "Analytics (jobs.score, neighbors, quality, fit_directions)", section_analytics,
     "no committed analytics table (run jobs.score, jobs.neighbors or jobs.quality)"),
    ("training", "Training (jobs.train_encoder)", section_training,
     "no train/log.jsonl, train/grids/ or train/eval.json (run jobs.train_encoder)"),
]


def section_overview(ctx: Context, done: int, absent: list[tuple[str, str]], shown_root: str) -> list:
    """What is here, what is not, and the warnings that apply to the whole page."""
    counted = [r for r in ctx.runs if r.counted]
    labels: set[str] = set()
    for names in ctx.labels.values():
        labels.update(names)
    for r in counted:
        met = r.summary.get("metrics")
        if isinstance(met, dict) and isinstance(met.get("backbones"), list):
            labels.update(str(x) for x in met["backbones"] if x)
    out: list = []
    if not done:
        out.append(Banner(f"Nothing here yet: no committed runs, tables or training output under {shown_root}.",
                          "info"))
    out += _backbones(sorted(labels))
    jobs = Counter(r.job for r in counted)
    line = f"Dataset root {shown_root}: {len(counted)} committed run(s)"
    if jobs:
        line += " (" + ", ".join(f"{j}: {n}" for j, n in sorted(jobs.items(), key=str)) + ")"
    out.append(Para(line + "."))
    if ctx.snaps:
        last: dict[str, tuple[int, str]] = {}
        for r in ctx.runs:
            for t, v in r.commits.items():
                if v >= last.get(t, (-1, ""))[0]:
                    last[t] = (v, f"{r.job} {r.run_id}")
        rows = [(name, s.version, s.files, s.rows, last.get(name, (0, "—"))[1])
                for name, s in sorted(ctx.snaps.items())]
        out.append(Table(["table", "version", "data files", "rows (committed)", "last run"], rows,
                         numeric=[False, True, True, True, False]))
    if absent:
        out.append(Items("Not found", [f"{t}: {w}" for t, w in absent]))
    if ctx.notes:
        out.append(Items("Notes", list(ctx.notes)))
    if ctx.images.missing:
        out.append(Banner(f"{ctx.images.missing} image(s) referenced by the tables could not be read "
                          "(shown as placeholders).", "warn"))
    return out
