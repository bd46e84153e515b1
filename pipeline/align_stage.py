"""Ray Data stages of the align job.

    ds = ray.data.from_items(listing_rows)                            # files not known by their listing
    ds = ds.map_batches(read_listed).map_batches(hash_files)          # tasks: bytes, image_id = sha256
    ds = run.mark_done(ds, FACES, key=("image_id",))                  # same bytes done under another
                                                                      # name -> skipped, bytes dropped
    ds = ds.map_batches(decode_batch, fn_kwargs={"section": align})  # tasks: decode (not the skipped)
    ds = ds.map_batches(AlignFaces, fn_constructor_kwargs={"section": align, ...},  # actors: MTCNN
                        compute=ray.data.ActorPoolStrategy(size=N), batch_size=B)    # loaded once

`align` is the job's AlignSection (pipeline.sections): every limit and policy of the stages.

`hash_files` turns (path, bytes) rows into (image_id, source_uri, status, error, bytes) rows,
keeping the bytes so that each file is read once; `decode_batch` decodes them into (..., width,
height, image, pixel_map, bytes) rows (a camera JPEG at reduced scale, its bytes kept for the
finer window a crop may need); `AlignFaces` turns those into rows of the `faces` table (pipeline.schemas),
one per aligned face, or one per input with a failure status (a skipped input passes through as
one row with status `skipped`), writing each crop as PNG under
`<output>/aligned/<image_id>_<face_index>.png`. Every input's first row carries its file-level
outcome in `_unit` (ok / failed / skipped; "" on its other rows), so the runner counts files,
not faces. Nothing here raises on bad data.
"""
from __future__ import annotations

import io
import logging
import traceback
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline import delta, storage
from pipeline.decode import IDENTITY_MAP, decode_image, decode_region
from pipeline.decode import image_id as hash_image_id
from pipeline.inputs import unread_id
from pipeline.runner import UNIT_COLUMN, is_done
from pipeline.schemas import SOURCE_LISTING_COLUMNS, faces_table
from pipeline.sections import AlignSection
from pipeline.status import STATUS_LOST, STATUS_OK, STATUS_SKIPPED

if TYPE_CHECKING:
    from stmodel.detect import Faces

log = logging.getLogger("stbatch.align")

EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
# The decode stage keeps at least this many pixels on a JPEG's longer side (DCT scaling): the
# detection copy (<= detect_max_side, 1024 by default) and most crops come from those pixels;
# a 4000x3000 photo is decoded at 2000x1500 in about 1/4 of the time of a full decode.
DRAFT_SIDE = 1500
REFINE_SIZE = 256           # side of the upright crop the landmark refinement re-detects on
PNG_STRATEGY_RLE = 3        # zlib Z_RLE: measured on 256 and 1024 crops, 5-15 % smaller files than
                            # the default strategy at level 1, and no slower (level 6: 3-4x slower)


def aligned_key(image_id: str, face_index: int) -> str:
    """Object key of an aligned crop: built from the image id and face index only."""
    return storage.image_key("aligned", image_id, face_index)


def source_uri_of(path: str, protocol: str | None) -> str:
    """Ray's `path` column (protocol stripped for remote filesystems) back to a URI."""
    if not protocol or protocol == "file" or "://" in path:
        return path
    return f"{protocol}://{path}"


def read_listed(batch: dict) -> dict:
    """Listing rows (source_uri, source_size, source_etag) -> the same rows with the file's
    `bytes`. A file gone or unreadable since the listing is dropped here, as Ray's reader drops
    a missing path: the runner finds its row missing and `lost_file_rows` writes its read_error."""
    keep, datas = [], []
    for i, uri in enumerate(batch["source_uri"]):
        try:
            datas.append(storage.read_bytes(str(uri)))
            keep.append(i)
        except Exception as e:  # noqa: BLE001 - accounted for by lost_file_rows
            log.warning("cannot read %s: %s", uri, type(e).__name__)
    out = {"source_uri": np.asarray(batch["source_uri"], dtype=object)[keep],
           **{k: v[keep] for k, v in _listing_columns(batch, len(batch["source_uri"])).items()}}
    out["bytes"] = np.array(datas + [b""], dtype=object)[:-1]
    return out


def _listing_columns(batch: dict, n: int) -> dict:
    """source_size (int64, -1: not reported) and source_etag (str, "": none) of the listing, typed
    the same in every block whatever it holds (a block of unknowns would otherwise be null-typed
    and fail to merge with the others)."""
    size = batch.get("source_size")
    tag = batch.get("source_etag")
    return {"source_size": np.array([-1 if v is None or v != v else int(v) for v in size] if size is not None
                                    else [-1] * n, dtype=np.int64),
            "source_etag": np.array([str(v) if v else "" for v in tag] if tag is not None else [""] * n,
                                    dtype=object)}


def hash_files(batch: dict, protocol: str | None = None) -> dict:
    """Read rows (`read_listed`, or `read_binary_files(include_paths=True)`) -> work rows:
    image_id (sha256 of the bytes), source_uri, status ok, the bytes kept for the decode stage,
    and the listing's size / version tag when the read rows have them."""
    datas = [bytes(d) if d is not None else b"" for d in batch["bytes"]]
    n = len(datas)
    uris = batch["source_uri"] if "source_uri" in batch else [source_uri_of(str(p), protocol) for p in batch["path"]]
    out = {"image_id": np.array([hash_image_id(d) for d in datas], dtype=object),
           "source_uri": np.array([str(u) for u in uris], dtype=object),
           "status": np.array([STATUS_OK] * n, dtype=object), "error": np.array([None] * n, dtype=object),
           "bytes": np.array(datas + [b""], dtype=object)[:-1]}
    out.update(_listing_columns(batch, n))
    return out


def decode_batch(batch: dict, section: AlignSection, protocol: str | None = None,
                 draft_side: int | None = DRAFT_SIDE) -> dict:
    """Decode stage over work rows (`hash_files`; raw (path, bytes) rows are hashed first).

    A large JPEG is decoded at the coarsest DCT scale that keeps its longer side >= `draft_side`
    (pipeline.decode; None: always full size): `image` holds those pixels, `pixel_map` [n, 3]
    where they lie in the full-resolution photo, and `bytes` keeps the file for the finer
    window a crop may need (empty when `image` is already full size). `width` / `height` are
    the photo's full oriented size. Rows whose status is not ok (skipped: already done) are
    passed through undecoded. `section`: its pixel and side limits, allowed formats and policy
    for animated / multi-page files (pipeline.decode)."""
    if "image_id" not in batch:
        batch = hash_files(batch, protocol)
    out: dict[str, list] = {k: [] for k in ("image_id", "source_uri", "status", "error", "width", "height", "image",
                                            "pixel_map", "bytes")}
    for i, data in enumerate(batch["bytes"]):
        out["image_id"].append(str(batch["image_id"][i]))
        out["source_uri"].append(str(batch["source_uri"][i]))
        status = str(batch["status"][i])
        if status != STATUS_OK:
            err = batch["error"][i]
            out["status"].append(status)
            out["error"].append("" if err is None else str(err))
            out["width"].append(-1)
            out["height"].append(-1)
            out["image"].append(EMPTY_IMAGE)
            out["pixel_map"].append(IDENTITY_MAP)
            out["bytes"].append(b"")
            continue
        data = bytes(data) if data is not None else b""
        d = decode_image(data, max_pixels=section.max_pixels, min_side=section.min_image_side,
                         min_long_side=draft_side, formats=section.formats, multi_frame=section.multi_frame)
        out["status"].append(d.status)
        out["error"].append(d.error or "")
        out["width"].append(-1 if d.width is None else d.width)
        out["height"].append(-1 if d.height is None else d.height)
        out["image"].append(d.image if d.image is not None else EMPTY_IMAGE)
        out["pixel_map"].append(d.pixel_map)
        out["bytes"].append(data if d.status == STATUS_OK and d.reduce > 1 else b"")
    res = {k: np.array(v, dtype=object) if k in ("image_id", "source_uri", "status", "error", "bytes") else v
           for k, v in out.items()}
    res.update(_listing_columns(batch, len(batch["bytes"])))  # passed through: faces rows record the listing
    res["width"] = np.array(out["width"], dtype=np.int64)
    res["height"] = np.array(out["height"], dtype=np.int64)
    res["pixel_map"] = np.array(out["pixel_map"], dtype=np.float64).reshape(-1, 3)
    return res


def _listed(batch: dict, k: str, i: int):
    """The listing's size / version tag of row i (None when the read did not carry them)."""
    if k not in batch:
        return None
    v = batch[k][i]
    if k == "source_size":
        return None if v is None or int(v) < 0 else int(v)
    return str(v) if v else None


def file_units(rows: list[list[dict]]) -> list[str]:
    """The `_unit` column for the rows of several inputs (one list of rows per input): the
    input's outcome on its first row, "" on the others."""
    out = []
    for rs in rows:
        st = [r["status"] for r in rs]
        unit = STATUS_SKIPPED if st == [STATUS_SKIPPED] else ("ok" if STATUS_OK in st else "failed")
        out += [unit] + [""] * (len(rs) - 1)
    return out


def failed_file_rows(batch: pa.Table, run_id: str) -> pa.Table:
    """Work rows of files never read (pipeline.inputs: refused by size; or skipped, already done)
    -> `faces` rows with their own status and error, one per file, counted per file."""
    rows = [{k: r.get(k) for k in ("image_id", "source_uri", "status", "error", *SOURCE_LISTING_COLUMNS)}
            for r in batch.to_pylist()]
    t = faces_table(rows, run_id)
    return t.append_column(UNIT_COLUMN, pa.array(file_units([[r] for r in rows]), pa.string()))


def lost_file_rows(batch: pa.Table, output: str, run_id: str, retry_failed: bool) -> pa.Table:
    """Listed files with no row written by the run (Ray's reader drops a file that vanished or
    cannot be listed any more; a worker crash can lose rows): read again here. Unreadable ->
    a `read_error` row (image_id from the URI, see `unread_id`); readable and already done in the
    committed table -> nothing (the main pass counted it as skipped); else a `lost` row with its
    image_id. Both statuses are transient: the next run tries the file again."""
    uris = [str(u) for u in batch.column("source_uri").to_pylist()]
    rows, ids = [], {}
    for uri in uris:
        try:
            data = storage.read_bytes(uri)
        except Exception as e:  # noqa: BLE001 - any storage failure is this file's error
            rows.append({"image_id": unread_id(uri), "source_uri": uri, "status": "read_error",
                         "error": f"file listed but could not be read: {type(e).__name__}: {e}"})
            continue
        ids[uri] = hash_image_id(data)
    done: set[str] = set()
    if ids:
        snap = delta.read_snapshot_arrow(output, "faces", columns=["image_id", "status"],
                                         filter_expr=pc.field("image_id").isin(sorted(set(ids.values()))))
        if snap is not None and snap.num_rows:
            flags = is_done(snap.column("status"), retry_failed).to_pylist()
            not_done = {i for i, f in zip(snap.column("image_id").to_pylist(), flags) if not f}
            done = {i for i, f in zip(snap.column("image_id").to_pylist(), flags) if f} - not_done
    for uri, iid in ids.items():
        if iid not in done:
            rows.append({"image_id": iid, "source_uri": uri, "status": STATUS_LOST,
                         "error": "file read, but its rows were lost by the pipeline (worker crash)"})
    t = faces_table(rows, run_id)
    return t.append_column(UNIT_COLUMN, pa.array(["failed"] * t.num_rows, pa.string()))


def select_faces(faces, policy: str, min_score: float, min_face_px: float,
                 max_faces: int) -> tuple[str, str | None, int, list[int]]:
    """Apply the face policy to detections sorted by area (largest first).

    Returns (status, error, n_faces, kept indices). n_faces counts detections with score >=
    min_score; a kept face's index among those is its `face_index` (0 = largest)."""
    scores = np.asarray(faces.scores, dtype=np.float64)
    cand = np.flatnonzero(scores >= min_score)
    if len(cand) == 0:
        best = f"; best score {scores.max():.3f}" if len(scores) else ""
        return "no_face", f"no face with score >= {min_score} ({len(scores)} weaker detections{best})", 0, []
    boxes = np.asarray(faces.boxes, dtype=np.float64)[cand]
    side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    big = np.flatnonzero(side >= min_face_px)
    if len(big) == 0:
        return ("too_small", f"{len(cand)} face(s) found, largest is {side.max():.0f} px < min_face_px "
                             f"{min_face_px}", int(len(cand)), [])
    if policy == "largest":
        big = big[:1]
    else:
        big = big[:max_faces]
    return STATUS_OK, None, int(len(cand)), [int(i) for i in big]


class Pixels:
    """Pixels of a photo that the stage works on: an RGB image and its `pixel_map` (a, bx, by):
    pixel (u, v) of `image` is at (a u + bx, a v + by) in the full-resolution oriented photo."""

    def __init__(self, image: np.ndarray, pixel_map=IDENTITY_MAP):
        self.image = image
        self.a, self.bx, self.by = (float(v) for v in pixel_map)

    def to_photo(self, points) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        return p * self.a + np.array([self.bx, self.by])

    def to_local(self, points) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        return (p - np.array([self.bx, self.by])) / self.a

    def box(self) -> tuple[float, float, float, float]:
        """The photo area these pixels cover (pixel-centre coordinates of the photo)."""
        h, w = self.image.shape[:2]
        x0, y0 = self.bx - 0.5 * self.a, self.by - 0.5 * self.a
        return x0, y0, x0 + w * self.a, y0 + h * self.a


def needed_reduction(qsize: float, need_px: float) -> int:
    """The coarsest JPEG reduction (8, 4, 2, 1) that leaves the quad >= need_px pixels on a side.

    Measured against crops from full-resolution pixels (same quad, 256 and 1024 crops of a face
    carrying pixel-level noise, the hardest case): >= 40 dB at 1 source pixel per output pixel,
    44 dB at 1.3, 49 dB at 2."""
    for r in (8, 4, 2):
        if qsize / r >= need_px:
            return r
    return 1


def _window(quads: list[np.ndarray], margin: float) -> tuple[float, float, float, float]:
    """Bounding box of the quads, each widened by `margin` x its side (+ 16 px)."""
    boxes = []
    for q in quads:
        side = float(np.hypot(*(q[3] - q[0])))
        m = margin * side + 16.0
        boxes.append((q[:, 0].min() - m, q[:, 1].min() - m, q[:, 0].max() + m, q[:, 1].max() + m))
    b = np.array(boxes)
    return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())


def _covers(outer, inner, width: int, height: int) -> bool:
    """Whether the window `outer` holds `inner` clipped to the photo (pixel-centre coordinates:
    the photo spans [-0.5, width - 0.5])."""
    ix0, iy0 = max(inner[0], -0.5), max(inner[1], -0.5)
    ix1, iy1 = min(inner[2], width - 0.5), min(inner[3], height - 0.5)
    return outer[0] <= ix0 + 1e-6 and outer[1] <= iy0 + 1e-6 and outer[2] >= ix1 - 1e-6 and outer[3] >= iy1 - 1e-6


def encode_crop_png(rgb: np.ndarray, compress_level: int) -> bytes:
    """PNG of an aligned crop: zlib level `compress_level` with the run-length strategy (see
    PNG_STRATEGY_RLE)."""
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=compress_level,
                                     compress_type=PNG_STRATEGY_RLE)
    return buf.getvalue()


class AlignFaces:
    """Callable class for `map_batches`: loads MTCNN once per actor, then per batch detects
    faces (one batched MTCNN call per image size), picks faces by policy, refines their
    landmarks on a first upright crop (`refine_passes`, one batched call), aligns, writes PNG
    crops, returns rows of the `faces` table (landmarks = the refined ones the quad uses; bbox and
    det_score from the first pass; all in full-resolution pixels of the EXIF-oriented photo).

    Camera photos: detection runs on the decode stage's reduced pixels (`pixel_map`); refinement
    and the crop need the face at >= max(size, 256) x `source_oversample` pixels across its
    quad. When the decoded pixels are coarser than that, the window around the faces (quad +
    margin) is decoded again from `bytes` at the coarsest JPEG scale that gives it, and only
    that window is oriented, converted and resampled."""

    def __init__(self, section: AlignSection, output: str, run_id: str, device: str = "cpu",
                 detect_batch: int | None = None, source_oversample: float = 1.0):
        """`detect_batch`: images per MTCNN call (default: the section's batch_size; an isolation
        pass runs smaller batches); `source_oversample`: source pixels per crop pixel asked of a
        reduced decode (benchmarks). Torch runs `num_cpus` threads (at least one)."""
        import torch

        from stmodel.detect import FaceDetector

        torch.set_num_threads(section.threads)
        self.section = section
        self.output, self.run_id = output, run_id
        self.need_px = max(section.size, REFINE_SIZE if section.refine_passes > 0 else 0) * source_oversample
        self.detector = FaceDetector(device=device, min_face_size=section.mtcnn_min_face,
                                     thresholds=section.mtcnn_thresholds, max_side=section.detect_max_side,
                                     max_batch=detect_batch or section.batch_size)

    def _detect(self, images: list[np.ndarray]) -> list:
        try:
            return self.detector.detect(images)
        except Exception:  # noqa: BLE001 - isolate the image that breaks the batch
            out: list[Faces | Exception] = []
            for im in images:
                try:
                    out.append(self.detector.detect([im])[0])
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out

    def _select(self, base: dict, faces) -> tuple[list[dict] | None, list[int], int, object]:
        """(failure rows or None, kept face indices, n_faces, faces) for one decoded image; the
        faces returned are the detections with score >= min_score, which the kept indices (the
        face_index of each row) index."""
        from stmodel.detect import Faces

        if isinstance(faces, Exception):
            return [{**base, "status": "align_error",
                     "error": f"face detection failed: {type(faces).__name__}: {faces}"}], [], 0, faces
        status, error, n_faces, keep = select_faces(faces, self.section.face_policy, self.section.min_score,
                                                    self.section.min_face_px, self.section.max_faces)
        if status != STATUS_OK:
            return [{**base, "status": status, "error": error, "n_faces": n_faces}], [], n_faces, faces
        cand = np.flatnonzero(np.asarray(faces.scores, dtype=np.float64) >= self.section.min_score)
        return None, keep, n_faces, Faces(faces.boxes[cand], faces.scores[cand], faces.landmarks[cand])

    def _refine(self, images: list[np.ndarray], landmarks: list[np.ndarray]) -> list[np.ndarray]:
        if self.section.refine_passes <= 0 or not images:
            return landmarks
        try:
            return self.detector.refine(images, landmarks, passes=self.section.refine_passes)
        except Exception:  # noqa: BLE001 - refinement is an improvement, never a failure
            log.warning("landmark refinement failed, keeping first-pass landmarks: %s", traceback.format_exc())
            return landmarks

    def _detection_pixels(self, px: Pixels, data: bytes, full_side: int) -> Pixels:
        """The decoded pixels, or finer ones when detect_max_side asks for more than they hold."""
        want = min(self.section.detect_max_side or full_side, full_side)
        if px.a <= 1 or not data or max(px.image.shape[:2]) >= 0.75 * want:
            return px
        d = decode_image(data, max_pixels=self.section.max_pixels, min_side=1, min_long_side=want)
        return Pixels(d.rgb, d.pixel_map) if d.status == STATUS_OK else px

    def _window_pixels(self, px: Pixels, data: bytes, quads: list[np.ndarray], margin: float = 0.5) -> Pixels:
        """Pixels fine enough for these faces' refinement and crops: `px` itself, or the window
        around the quads decoded again at the coarsest scale that gives need_px across each."""
        if px.a <= 1 or not data:
            return px
        r = min(needed_reduction(float(np.hypot(*(q[3] - q[0]))), self.need_px) for q in quads)
        if r >= px.a:
            return px
        d = decode_region(data, r, _window(quads, margin), max_pixels=self.section.max_pixels)
        if d.status != STATUS_OK:
            raise ValueError(f"cannot decode the face window again: {d.error}")
        return Pixels(d.rgb, d.pixel_map)

    def _align_faces(self, base: dict, work: Pixels, decoded: Pixels, data: bytes, faces, keep: list[int],
                     n_faces: int, landmarks: np.ndarray) -> list[dict]:
        from stmodel.align import crop_from_quad, ffhq_quad

        quads: list[np.ndarray | None] = []
        for lm in landmarks:
            try:
                quads.append(ffhq_quad(lm)[0])
            except Exception:  # noqa: BLE001 - reported per face below
                quads.append(None)
        good = [q for q in quads if q is not None]
        # Refinement moved the quads a little: should a crop (quad + border + resampling margin)
        # leave the window, decode the window again around the refined quads.
        if good and work is not decoded and not all(_covers(work.box(), _window([q], 0.3), base["width"],
                                                            base["height"]) for q in good):
            work = self._window_pixels(decoded, data, good)
        rows = []
        for j, k in enumerate(keep):
            lm = landmarks[j]
            row = {**base, "n_faces": n_faces, "face_index": k, "det_score": float(faces.scores[k]),
                   "bbox": faces.boxes[k], "landmarks": lm}
            try:
                q = quads[j]
                quad = q if q is not None else ffhq_quad(lm)[0]  # (the latter raises the reason)
                crop = crop_from_quad(work.image, work.to_local(quad), size=self.section.size,
                                      supersample=self.section.supersample)
                uri = storage.join(self.output, aligned_key(base["image_id"], k))
                storage.write_bytes(uri, encode_crop_png(crop, self.section.png_compress_level))
                rows.append({**row, "status": STATUS_OK, "quad": quad.astype(np.float32), "aligned_uri": uri})
            except Exception as e:  # noqa: BLE001
                log.warning("align failed for %s face %d: %s", base["source_uri"], k, traceback.format_exc())
                rows.append({**row, "status": "align_error", "error": f"{type(e).__name__}: {e}"})
        return rows

    def __call__(self, batch: dict) -> pa.Table:
        from stmodel.align import ffhq_quad
        from stmodel.detect import Faces

        n = len(batch["image_id"])
        maps = batch.get("pixel_map")
        datas = batch.get("bytes")
        bases, todo = [], []
        for i in range(n):
            w, h = int(batch["width"][i]), int(batch["height"][i])
            base = {"image_id": str(batch["image_id"][i]), "source_uri": str(batch["source_uri"][i]),
                    "status": str(batch["status"][i]), "error": str(batch["error"][i]) or None,
                    "width": w if w >= 0 else None, "height": h if h >= 0 else None,
                    **{k: _listed(batch, k, i) for k in SOURCE_LISTING_COLUMNS}}
            bases.append(base)
            if base["status"] == STATUS_OK:
                todo.append(i)
        data = {i: bytes(datas[i]) if datas is not None and datas[i] is not None else b"" for i in todo}
        decoded = {i: Pixels(np.asarray(batch["image"][i], dtype=np.uint8),
                             IDENTITY_MAP if maps is None else maps[i]) for i in todo}
        det_px = {i: self._detection_pixels(decoded[i], data[i], max(bases[i]["width"] or 0, bases[i]["height"] or 0))
                  for i in todo}
        detections = {}
        for i, f in zip(todo, self._detect([det_px[i].image for i in todo]) if todo else []):
            if not isinstance(f, Exception):  # boxes and landmarks in full-resolution photo pixels
                px = det_px[i]
                f = Faces(px.to_photo(f.boxes.reshape(-1, 2, 2)).reshape(-1, 4).astype(np.float32), f.scores,
                          px.to_photo(f.landmarks).astype(np.float32))
            detections[i] = f
        rows: dict[int, list[dict]] = {}
        kept: dict[int, tuple[list[int], int]] = {}
        for i, base in enumerate(bases):
            if i not in detections:
                rows[i] = [base]  # decode failure or skipped: one row, status + error as decoded
                continue
            failed, keep, n_faces, detections[i] = self._select(base, detections[i])
            if failed is not None:
                rows[i] = failed
            else:
                kept[i] = (keep, n_faces)
        order, work = list(kept), {}
        for i in order:
            try:
                work[i] = self._window_pixels(decoded[i], data[i],
                                              [ffhq_quad(lm)[0] for lm in detections[i].landmarks[kept[i][0]]])
            except Exception:  # noqa: BLE001 - degenerate landmarks (the crop reports them) or a failed re-decode
                work[i] = decoded[i]
        refined = self._refine([work[i].image for i in order],
                               [work[i].to_local(detections[i].landmarks[kept[i][0]]) for i in order])
        for i, lms in zip(order, refined):
            keep, n_faces = kept[i]
            try:
                rows[i] = self._align_faces(bases[i], work[i], decoded[i], data[i], detections[i], keep, n_faces,
                                            work[i].to_photo(lms).astype(np.float32))
            except Exception as e:  # noqa: BLE001 - never crash on data
                rows[i] = [{**bases[i], "status": "align_error", "error": f"{type(e).__name__}: {e}"}]
        per_input = [rows[i] for i in range(n)]
        t = faces_table([r for rs in per_input for r in rs], self.run_id)
        return t.append_column(UNIT_COLUMN, pa.array(file_units(per_input), pa.string()))
