"""A dataset root shaped like the demo's, for the report's browser and injection tests, made in
a few seconds without Ray: the tables are committed through the job runner, every image comes
from the tiny seeded model (`tests.conftest.seeded_tiny_model`) or from real paste-back.

Photos: scikit-image's astronaut, a mirrored JPEG copy and a smaller copy on a wider canvas, each
with a known face quad. Aligned crops are cut with `stmodel.align.crop_from_quad`, inverted by
the tiny encoder and reconstructed by its generator; edits move the codes along fixed
directions; reconstructions and edits are pasted back into their photos (`stmodel.align.paste_back`)
as jobs.invert / jobs.edit do with `paste_back`. Synthetic faces (generator samples in a plain
folder, no photo) stand for the demo's training images. Training output: a log, grids and
eval.json as jobs.train_encoder writes them. Some rows fail, as in the demo.

`poison`: text appended to every text field of every table (and to the run names in eval.json);
the image URIs instead carry a presigned-looking query in their real file names, so the images
still load and their URIs still must not show the query's secrets. The poisoned tables are
written unredacted, as another engine could write them: this project's own writer redacts
every row (`pipeline.delta.write_data_file`).
"""
from __future__ import annotations

import io
import json
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline import delta, storage
from pipeline.decode import image_id
from pipeline.images import encode_png
from pipeline.runner import JobRun, TableSpec, WriteResult
from pipeline.schemas import FACES_SCHEMA, edits_schema, faces_table, latents_schema, make_table, metrics_schema
from pipeline.scoring import to_uint8
from stmodel.align import crop_from_quad, paste_back
from tests.conftest import seeded_tiny_model

# the settings a run record holds, for the runs these tests make by hand

# A presigned URL's query, as a file name may carry it; the values must never reach the page.
SIGNED_QUERY = "?X-Amz-Signature=SIGSECRET0&X-Amz-Credential=CREDSECRET0"
POISON = ("<script>alert(1)</script> https://b.s3.amazonaws.com/k?X-Amz-Signature=SIGSECRET1"
          "&X-Amz-Credential=CREDSECRET1")
SECRETS = ("SIGSECRET0", "CREDSECRET0", "SIGSECRET1", "CREDSECRET1")
SECTIONS = ("overview", "jobs", "faces", "latents", "metrics", "edits", "analytics", "training")

# The astronaut's face in skimage's 512x512 photo: top-left, bottom-left, bottom-right, top-right.
QUAD = np.array([[160, 30], [160, 230], [360, 230], [360, 30]], dtype=np.float64)
CROP = 64


def _photos() -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """name -> (pixels, face quad, format)."""
    from skimage import data

    a = data.astronaut()
    mirrored = np.ascontiguousarray(a[:, ::-1])
    mq = QUAD.copy()
    mq[:, 0] = 511 - mq[:, 0]
    mq = mq[[3, 2, 1, 0]]  # mirrored: keep the corner order
    small = np.asarray(Image.fromarray(a).resize((384, 384), Image.LANCZOS))
    wide = np.full((420, 700, 3), 200, dtype=np.uint8)
    wide[20:404, 250:634] = small
    wq = QUAD * 0.75 + np.array([250, 20])
    return {"astronaut.png": (a, QUAD, "PNG"), "astronaut_mirrored.jpg": (mirrored, mq, "JPEG"),
            "astronaut_small_wide.png": (wide, wq, "PNG")}


def _encode(rgb: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float() / 127.5 - 1


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def build(root: str, poison: str = "") -> dict:
    """Write the dataset under `root`; returns {"faces": n ok faces, "edits": n edits, ...}."""
    txt = (lambda s: None if s is None else f"{s}{poison}") if poison else (lambda s: s)
    q = SIGNED_QUERY if poison else ""

    def put(rel: str, data: bytes) -> str:
        uri = storage.join(root, rel + q)
        storage.write_bytes(uri, data)
        return uri

    m = seeded_tiny_model()
    faces_rows, photos = [], {}
    crops = []
    for name, (rgb, quad, fmt) in _photos().items():
        data = _encode(rgb, fmt)
        iid = image_id(data)
        src = put(f"photos/{name}", data)
        crop = crop_from_quad(rgb, quad, size=CROP)
        aligned = put(f"aligned/{iid[:16]}_0.png", encode_png(crop))
        photos[iid] = (rgb, quad, src)
        crops.append((iid, crop, aligned))
        faces_rows.append({"image_id": txt(iid), "source_uri": src, "status": "ok", "n_faces": 1, "face_index": 0,
                           "det_score": 0.999 + len(faces_rows) / 10_000, "quad": quad, "aligned_uri": aligned,
                           "width": rgb.shape[1], "height": rgb.shape[0]})
    grad = np.linspace(0, 255, 128 * 128 * 3).reshape(128, 128, 3).astype(np.uint8)
    bad = {"no_face.png": ("no_face", "no face found above min_score=0.9"),
           "notes.jpg": ("decode_error", "not a recognised image format (48 bytes, starts with b'not an i')")}
    for name, (status, error) in bad.items():
        data = encode_png(grad) if name.endswith(".png") else b"not an image: the job must report it, not crash"
        faces_rows.append({"image_id": txt(image_id(data)), "source_uri": put(f"photos/{name}", data),
                           "status": txt(status), "error": txt(error), "n_faces": 0})
    faces_spec = TableSpec("faces", FACES_SCHEMA, ("image_id", "face_index"))
    _commit(root, "align", faces_spec, faces_table(faces_rows, "x"), len(faces_rows), len(crops),
            bool(poison))

    # synthetic faces: generator samples in a plain folder (no photo to paste into)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        w = m.latent_avg[None, :m.n_latent] + 0.7 * torch.randn(12, m.n_latent, m.latent_avg.shape[-1], generator=g)
        synth = to_uint8(m.reconstruct(w))
    for i, img in enumerate(synth):
        data = encode_png(img)
        crops.append((image_id(data), img, put(f"synthetic/img_{i:05d}.png", data)))

    with torch.no_grad():
        x = torch.cat([_to_tensor(np.asarray(Image.fromarray(c).resize((CROP, CROP)))) for _, c, _ in crops])
        codes = m.invert(x)
        recon = to_uint8(m.reconstruct(codes))
    lat = {k: [] for k in ("image_id", "face_index", "source_uri", "aligned_uri", "status", "error", "model",
                           "checkpoint_sha256", "psnr", "mse", "metric_backbones", "reconstruction_uri",
                           "composite_uri", "psnr_outside", "psnr_box")}
    sources = {}
    for (iid, crop, aligned), rec in zip(crops, recon):
        rec_uri = put(f"reconstructions/{iid[:16]}_0.png", encode_png(rec))
        small = np.asarray(Image.fromarray(crop).resize(rec.shape[:2][::-1], Image.LANCZOS))
        mse = float(np.mean((small / 255.0 - rec / 255.0) ** 2))
        comp_uri = outside = box = None
        if iid in photos:
            rgb, quad, src = photos[iid]
            comp = paste_back(rgb, rec, quad)
            comp_uri = put(f"composites/reconstructions/{iid[:16]}_0.png", encode_png(comp))
            outside, box = float("inf"), _psnr(comp[30:230, 160:360], rgb[30:230, 160:360])
        sources[iid] = rec_uri
        for k, v in (("image_id", txt(iid)), ("face_index", 0), ("source_uri", photos.get(iid, (0, 0, None))[2]),
                     ("aligned_uri", aligned), ("status", "ok"), ("error", None), ("model", txt("demo-tiny-encoder")),
                     ("checkpoint_sha256", txt("ab" * 32)), ("psnr", 10 * np.log10(1 / mse)), ("mse", mse),
                     ("metric_backbones", txt("none (metric_weights.skip_missing)")),
                     ("reconstruction_uri", rec_uri), ("composite_uri", comp_uri), ("psnr_outside", outside),
                     ("psnr_box", box)):
            lat[k].append(v)
    n = len(crops)
    lat_spec = TableSpec("latents", latents_schema(m.n_latent, codes.shape[-1]), ("image_id", "face_index"))
    _commit(root, "invert", lat_spec, make_table(lat, lat_spec.schema, "x", w_plus=codes.numpy(),
                                                 ok=np.ones(n, dtype=bool)), n, n, bool(poison))
    met = {k: lat[k] for k in ("image_id", "face_index", "status", "psnr", "mse", "metric_backbones",
                               "reconstruction_uri", "aligned_uri", "model", "checkpoint_sha256")}
    met_spec = TableSpec("metrics", metrics_schema(), ("image_id", "face_index"))
    _commit(root, "evaluate", met_spec, make_table(met, met_spec.schema, "x"), n, n, bool(poison))

    # edits: label / reference / direction of the photo faces and two synthetic ones
    dirs = torch.randn(2, codes.shape[-1], generator=g)
    ed = {k: [] for k in ("edit_id", "image_id", "face_index", "kind", "attribute", "strength", "target",
                          "reference_image_id", "direction_uri", "status", "error", "output_uri",
                          "source_reconstruction_uri", "composite_uri", "psnr_outside", "psnr_box",
                          "logit_before", "logit_after", "model")}
    plans = [("label", 3.0, 1, None), ("label", 3.0, 0, None), ("reference", 1.0, None, crops[-1][0]),
             ("direction", 4.0, None, None)]
    picked = [c for c in range(len(crops)) if crops[c][0] in photos] + [len(photos), len(photos) + 1]
    with torch.no_grad():
        for i in picked:
            iid = crops[i][0]
            for k, (kind, strength, target, ref) in enumerate(plans):
                edit_id = f"{i:02d}{k}" + "e" * 62
                d = dirs[k % 2] * (strength if target != 0 else -strength)
                out = to_uint8(m.reconstruct(codes[i:i + 1] + d))[0]
                failed = (i, k) == (picked[-1], 3)
                row = {"edit_id": txt(edit_id), "image_id": txt(iid), "face_index": 0, "kind": txt(kind),
                       "attribute": txt("synthetic_a"), "strength": strength, "target": target,
                       "reference_image_id": txt(ref), "status": txt("edit_error") if failed else "ok",
                       "error": txt("boom: the generator failed") if failed else None,
                       "output_uri": None if failed else put(f"edits/{edit_id[:16]}.png", encode_png(out)),
                       "source_reconstruction_uri": sources[iid], "logit_before": -1.0 + k, "logit_after": 1.5 + k,
                       "model": txt("demo-tiny-encoder"),
                       "direction_uri": txt(f"{root}/synthetic_meta/direction_synthetic_a.npy") if kind == "direction"
                       else None}
                if iid in photos and not failed:
                    rgb, quad, _ = photos[iid]
                    comp = paste_back(rgb, out, quad)
                    row.update(composite_uri=put(f"composites/edits/{edit_id[:16]}.png", encode_png(comp)),
                               psnr_outside=float("inf"), psnr_box=_psnr(comp[30:230, 160:360], rgb[30:230, 160:360]))
                for c in ed:
                    ed[c].append(row.get(c))
    n_ed = len(ed["edit_id"])
    ed_spec = TableSpec("edits", edits_schema(), ("edit_id",))
    _commit(root, "edit", ed_spec, make_table(ed, ed_spec.schema, "x"), n_ed, n_ed - 1, bool(poison))

    _analytics(root, [c[0] for c in crops], codes.numpy(), np.asarray(lat["psnr"], np.float64), txt, bool(poison))
    _training(root, np.concatenate([synth, recon]), poison)
    return {"faces": len(photos), "crops": len(crops), "edits": n_ed, "composites": len(photos) * (1 + len(plans))}


def _analytics(root: str, ids: list[str], codes: np.ndarray, psnr: np.ndarray, txt, raw: bool) -> None:
    """The analytics tables as jobs.score / jobs.neighbors / jobs.quality leave them, computed here
    from the codes: probabilities of two attributes from fixed directions, the 3 nearest faces
    (Euclidean, mean code), the astronaut and its smaller copy as one duplicate group, and the
    Mahalanobis distances under the shrunk covariance."""
    from pipeline.code_stats import ledoit_wolf
    from pipeline.schemas import duplicate_groups_schema, neighbors_schema, quality_schema, scores_schema

    n = len(ids)
    x = codes.astype(np.float64).mean(axis=1)
    xc = x - x.mean(0)
    rng = np.random.default_rng(3)
    probs = 1 / (1 + np.exp(-(xc @ rng.standard_normal((x.shape[1], 2))) / 4))
    base = {"image_id": [txt(i) for i in ids], "face_index": [0] * n, "status": ["ok"] * n}
    sc = scores_schema(["Smiling", "Eyeglasses"])
    _commit(root, "score", TableSpec("scores", sc, ("image_id", "face_index")),
            make_table({**base, "classifier_sha256": [txt("cd" * 32)] * n, "Smiling": probs[:, 0],
                        "Eyeglasses": probs[:, 1]}, sc, "x"), n, n, raw)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1)[:, :3]
    nb = {"space": [], "image_id": [], "face_index": [], "rank": [], "neighbor_image_id": [], "neighbor_face_index": [],
          "distance": [], "status": []}
    for i in range(n):
        for r, j in enumerate(order[i]):
            for k, v in (("space", "wplus"), ("image_id", txt(ids[i])), ("face_index", 0), ("rank", r + 1),
                         ("neighbor_image_id", txt(ids[j])), ("neighbor_face_index", 0), ("distance", d[i, j]),
                         ("status", "ok")):
                nb[k].append(v)
    _commit(root, "neighbors", TableSpec("neighbors", neighbors_schema(), ("space", "image_id", "face_index", "rank")),
            make_table(nb, neighbors_schema(), "x"), n, n, raw)
    rep = min(ids[0], ids[2])
    group = [rep if i in (0, 2) else ids[i] for i in range(n)]
    _commit(root, "neighbors",
            TableSpec("duplicate_groups", duplicate_groups_schema(), ("space", "image_id", "face_index")),
            make_table({**base, "space": ["wplus"] * n, "group_id": [txt(f"{g}:0") for g in group],
                        "group_size": [2 if i in (0, 2) else 1 for i in range(n)],
                        "representative_image_id": [txt(g) for g in group], "representative_face_index": [0] * n,
                        "threshold": [0.02] * n}, duplicate_groups_schema(), "x"), n, n, raw)
    cov, _ = ledoit_wolf(n, xc.T @ xc, (xc ** 2).T @ (xc ** 2))
    maha = np.sqrt(np.einsum("ij,jk,ik->i", xc, np.linalg.inv(cov), xc))
    _commit(root, "quality", TableSpec("quality", quality_schema(), ("image_id", "face_index")),
            make_table({**base, "mahalanobis": maha, "psnr": psnr, "psnr_z": (psnr.mean() - psnr) / psnr.std()},
                       quality_schema(), "x"), n, n, raw)


def _commit(root: str, job: str, spec: TableSpec, t: pa.Table, n_in: int, n_ok: int, raw: bool) -> None:
    """One run of `job` committing `t`. `raw`: the data file is written as another engine (or
    this project before its rows were redacted) would leave it, text untouched, so that what
    the report shows of it is the report's own doing."""
    r = JobRun(root, job)
    res = WriteResult(files=[_raw_file(root, spec.name, r.run_id, t)]) if raw else r.write_small(spec, t)
    r.commit({spec: res}, {"in": n_in, "ok": n_ok, "failed": n_in - n_ok, "skipped": 0, "seconds": 1.0},
             replace=False)


def _raw_file(root: str, table: str, run_id: str, t: pa.Table) -> delta.FileRecord:
    name = f"part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"
    path = os.path.join(delta.table_root(root, table), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t = t.replace_schema_metadata(None).cast(delta.delta_schema(t.schema))
    pq.write_table(t, path)
    return delta.FileRecord(name, os.path.getsize(path), t.num_rows)


def _training(root: str, images: np.ndarray, poison: str) -> None:
    """train/log.jsonl, train/grids/*.png (of `images`, the generator's) and train/eval.json as
    jobs.train_encoder writes them, and its run (a record, no table)."""
    lines = [{"step": s, "loss": 0.5 / (1 + s / 100), "l2": 0.5 / (1 + s / 100), "seconds": s * 0.02}
             for s in range(25, 1525, 25)]
    storage.write_bytes(storage.join(root, "train/log.jsonl"), "\n".join(json.dumps(x) for x in lines).encode())
    for k, step in enumerate((250, 500, 750, 1000, 1250, 1500)):
        tiles = np.roll(images, -k, axis=0)[:16]  # two rows of 8, as the trainer's validation grids
        grid = np.concatenate([np.concatenate(list(tiles[r * 8:(r + 1) * 8]), axis=1) for r in range(2)], axis=0)
        grid = np.asarray(Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST))
        storage.write_bytes(storage.join(root, f"train/grids/val_step_{step:06d}.png"), encode_png(grid))
    ev = {"trained": {"psnr": 18.0, "w_mse": 1.09}, "mean_latent": {"psnr": 12.1, "w_mse": 0.28},
          "untrained": {"psnr": 7.0, "w_mse": 1.2}}
    if poison:
        ev = {f"{k}{poison}": v for k, v in ev.items()}
    storage.write_bytes(storage.join(root, "train/eval.json"), json.dumps(ev).encode())
    JobRun(root, "train_encoder").commit({}, {"in": 384, "ok": 384, "failed": 0, "skipped": 0, "seconds": 60.0})
