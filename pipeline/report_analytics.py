"""The report's analytics section, as blocks: attribute prevalence (`scores`), near-duplicate
groups as thumbnail strips (`duplicate_groups`), the most atypical and worst-reconstructed faces
(`quality`), nearest-neighbour strips for a sample of faces (`neighbors`), and the sweeps of the
published directions that jobs.edit rendered (`edits` rows whose direction file is a committed
direction of this dataset).

Each part reads the scalar columns it shows and a bounded number of rows for thumbnails; a part
whose table is absent is left out, and the section is absent when all are.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.report_blocks import Charts, Heading, ImageRow, Note, Para, Table
from pipeline.report_charts import BarChart
from pipeline.report_data import where
from pipeline.report_sections import Context, _col, _known

FIXED_SCORE_COLUMNS = {"image_id", "face_index", "status", "error", "classifier_sha256", "classifier_run_id",
                       "latents_run_id", "run_id", "created_at"}
DIRECTION_FILES = "/model_files/direction/"


def _thumbs(ctx: Context, keys: list[tuple[str, str]], uris: dict[str, str]) -> list:
    """(image_id, caption) -> thumbnails of the faces' aligned crops."""
    return [ctx.images.thumb(uris.get(iid), cap, title=str(iid)) for iid, cap in keys]


def _prevalence(ctx: Context) -> list:
    snap = ctx.snaps.get("scores")
    if snap is None:
        return []
    cols = [c for c in snap.names if c not in FIXED_SCORE_COLUMNS and pa.types.is_floating(snap.schema.field(c).type)]
    t = snap.read(cols + ["classifier_sha256"], where(snap.names, status="ok"))
    if not t.num_rows or not cols:
        return [Heading("Attribute prevalence (jobs.score)"), Note("no ok scores")]
    share = [float(np.mean(np.nan_to_num(np.asarray(pc.fill_null(t[c], np.nan).to_numpy(), np.float64)) > 0.5))
             for c in cols]
    shas = sorted({s[:12] for s in _col(t, "classifier_sha256") if s})
    return [Heading("Attribute prevalence (jobs.score)"),
            Para(f"{t.num_rows} faces scored by classifier {', '.join(shas)}: the share with P(attribute) > 0.5."),
            Charts([BarChart(share, cols, "share of faces with P > 0.5", ylabel="share")]),
            Table(["attribute", "faces with P > 0.5", "share"],
                  [(c, int(round(s * t.num_rows)), round(s, 4)) for c, s in zip(cols, share)],
                  numeric=[False, True, True])]


def _duplicates(ctx: Context) -> list:
    snap = ctx.snaps.get("duplicate_groups")
    if snap is None:
        return []
    max_n = ctx.cfg.max_images
    t = snap.read(["space", "image_id", "group_id", "group_size", "threshold"], pc.field("group_size") > 1)
    out: list = [Heading("Near-duplicate groups (jobs.neighbors)")]
    if not t.num_rows:
        return out + [Note("no group of two or more faces under the threshold")]
    groups: OrderedDict = OrderedDict()
    # the ratio rule gives each face its own threshold: a group is (space, group_id), whatever
    # its members' thresholds
    for r in sorted(t.to_pylist(), key=lambda r: (-r["group_size"], r["space"], r["group_id"], r["image_id"])):
        groups.setdefault((r["space"], r["group_id"]), []).append((r["image_id"], r["threshold"]))
    out.append(Para(f"{len(groups)} groups, {t.num_rows} faces (connected components of the near-duplicate "
                    f"pairs); the largest {min(max_n, len(groups))}:"))
    shown = list(groups.items())[:max_n]
    uris = _known(ctx, sorted({i for _, m in shown for i, _ in m}), "aligned_uri")
    for (space, gid), members in shown:
        lo, hi = min(th for _, th in members), max(th for _, th in members)
        label = f"{space} < {hi:g}" if lo == hi else f"{space} < {lo:.3g}-{hi:.3g}"
        out.append(ImageRow(label, _thumbs(ctx, [(i, str(i)[:10]) for i, _ in members], uris),
                            title=f"group {gid}: {len(members)} faces"))
    return out


def _outliers(ctx: Context) -> list:
    snap = ctx.snaps.get("quality")
    if snap is None:
        return []
    max_n = ctx.cfg.max_images
    t = snap.read(["image_id", "mahalanobis", "psnr", "psnr_z", "lpips_z"], where(snap.names, status="ok"))
    out: list = [Heading("Atypical codes and bad reconstructions (jobs.quality)")]
    if not t.num_rows:
        return out + [Note("no ok quality rows")]
    rows = t.to_pylist()
    odd = sorted(rows, key=lambda r: -(r["mahalanobis"] or 0))[:max_n]
    bad = [r for r in sorted(rows, key=lambda r: -(r["psnr_z"] if r["psnr_z"] is not None else -np.inf))
           if r["psnr_z"] is not None][:max_n]
    uris = _known(ctx, sorted({r["image_id"] for r in odd + bad}), "aligned_uri")
    out += [Para(f"The {len(odd)} most atypical of {len(rows)} codes (Mahalanobis distance from the dataset's mean "
                 f"code, shrunk covariance):"),
            ImageRow("atypical", _thumbs(ctx, [(r["image_id"], f"d={r['mahalanobis']:.1f}") for r in odd], uris))]
    if bad:
        out += [Para("The worst reconstructions (PSNR z-score against the dataset; high = worse):"),
                ImageRow("worst PSNR", _thumbs(ctx, [(r["image_id"], f"z={r['psnr_z']:.1f}") for r in bad], uris))]
    else:
        out.append(Note("no reconstruction metrics in the latents table (jobs.invert with metrics=true)"))
    return out


def _neighbours(ctx: Context, faces: int = 4) -> list:
    snap = ctx.snaps.get("neighbors")
    if snap is None:
        return []
    out: list = [Heading("Nearest neighbours (jobs.neighbors)")]
    for space in sorted(x for x in snap.distinct("space") if x):
        first = snap.head(faces * 64, ["image_id"], (pc.field("space") == space) & (pc.field("rank") == 1))
        ids = list(dict.fromkeys(_col(first, "image_id")))[:faces]
        if not ids:
            continue
        t = snap.read(["image_id", "rank", "neighbor_image_id", "distance"],
                      (pc.field("space") == space) & pc.field("image_id").isin(ids))
        rows = sorted(t.to_pylist(), key=lambda r: (ids.index(r["image_id"]), r["rank"]))
        uris = _known(ctx, sorted(set(ids) | {r["neighbor_image_id"] for r in rows}), "aligned_uri")
        for iid in ids:
            mine = [r for r in rows if r["image_id"] == iid]
            keys = [(iid, "face")] + [(r["neighbor_image_id"], f"#{r['rank']} {r['distance']:.3g}") for r in mine]
            out.append(ImageRow(f"{space}: {str(iid)[:10]}", _thumbs(ctx, keys, uris), title=str(iid)))
    return out if len(out) > 1 else out + [Note("no neighbour rows")]


def _sweeps(ctx: Context, faces: int = 3) -> list:
    snap = ctx.snaps.get("edits")
    if snap is None or not snap.has("direction_uri"):
        return []
    t = snap.read(["image_id", "kind", "strength", "direction_uri", "output_uri", "source_reconstruction_uri"],
                  where(snap.names, status="ok"))
    rows = [r for r in t.to_pylist() if r["kind"] == "direction" and DIRECTION_FILES in str(r["direction_uri"] or "")]
    if not rows:
        return []
    out: list = [Heading("Direction sweeps (jobs.fit_directions, rendered by jobs.edit)")]
    by_dir: OrderedDict = OrderedDict()
    for r in sorted(rows, key=lambda r: (r["direction_uri"], r["image_id"], r["strength"])):
        by_dir.setdefault(r["direction_uri"], OrderedDict()).setdefault(r["image_id"], []).append(r)
    for uri, per_face in by_dir.items():
        name = uri.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        for iid, edits in list(per_face.items())[:faces]:
            thumbs = [ctx.images.thumb(edits[0]["source_reconstruction_uri"], "source")]
            thumbs += [ctx.images.thumb(e["output_uri"], f"{e['strength']:+g} std") for e in edits]
            out.append(ImageRow(f"{name}: {str(iid)[:10]}", thumbs, title=uri))
    return out


def section_analytics(ctx: Context) -> list | None:
    parts = [_prevalence(ctx), _duplicates(ctx), _outliers(ctx), _neighbours(ctx), _sweeps(ctx)]
    blocks = [b for p in parts for b in p]
    return blocks or None
