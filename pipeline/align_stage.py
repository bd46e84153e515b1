"""Ray Data stages of the align job.

    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
    ds = ds.map_batches(hash_files, fn_kwargs=...)                   # tasks: image_id = sha256(bytes)
    ds = run.mark_done(ds, FACES, key=("image_id",))                  # done images -> status skipped
    ds = ds.map_batches(decode_batch, fn_kwargs=dict(...))            # tasks: decode (not the skipped)
    ds = ds.map_batches(AlignFaces, fn_constructor_kwargs=dict(...),  # actors: MTCNN loaded once
                        compute=ray.data.ActorPoolStrategy(size=N), batch_size=B)

`hash_files` turns (path, bytes) rows into (image_id, source_uri, status, error, bytes) rows,
keeping the bytes so that each file is read once; `decode_batch` decodes them into (..., width,
height, image) rows; `AlignFaces` turns those into rows of the `faces` table (pipeline.schemas),
one per aligned face, or one per input with a failure status (a skipped input passes through as
one row with status `skipped`), writing each crop as PNG under
`<output>/aligned/<image_id>_<face_index>.png`. Every input's first row carries its file-level
outcome in `_unit` (ok / failed / skipped; "" on its other rows), so the runner counts files,
not faces. Nothing here raises on bad data.
"""
from __future__ import annotations

import hashlib
import logging
import traceback

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import delta, storage
from pipeline.decode import STATUS_OK, decode_image, image_id as hash_image_id
from pipeline.images import encode_png
from pipeline.runner import STATUS_LOST, STATUS_SKIPPED, UNIT_COLUMN, is_done
from pipeline.schemas import faces_table

log = logging.getLogger("stbatch.align")

EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
FACE_POLICIES = ("largest", "all")
UNREAD_PREFIX = "unread:"


def aligned_key(image_id: str, face_index: int) -> str:
    """Object key of an aligned crop: built from the image id and face index only."""
    return storage.image_key("aligned", image_id, face_index)


def source_uri_of(path: str, protocol: str | None) -> str:
    """Ray's `path` column (protocol stripped for remote filesystems) back to a URI."""
    if not protocol or protocol == "file" or "://" in path:
        return path
    return f"{protocol}://{path}"


def unread_id(source_uri: str) -> str:
    """The `image_id` of a row for a file whose bytes were never read: derived from its URI (not
    a content hash), so that the same unreadable file keeps one row across runs."""
    return UNREAD_PREFIX + hashlib.sha256(source_uri.encode()).hexdigest()


def hash_files(batch: dict, protocol: str | None = None) -> dict:
    """`read_binary_files(include_paths=True)` rows -> work rows: image_id (sha256 of the bytes),
    source_uri, status ok, the bytes kept for the decode stage."""
    datas = [bytes(d) if d is not None else b"" for d in batch["bytes"]]
    n = len(datas)
    return {"image_id": np.array([hash_image_id(d) for d in datas], dtype=object),
            "source_uri": np.array([source_uri_of(str(p), protocol) for p in batch["path"]], dtype=object),
            "status": np.array([STATUS_OK] * n, dtype=object), "error": np.array([None] * n, dtype=object),
            "bytes": np.array(datas, dtype=object)}


def decode_batch(batch: dict, max_pixels: int = 64_000_000, min_side: int = 32, protocol: str | None = None) -> dict:
    """Decode stage over work rows (`hash_files`; raw (path, bytes) rows are hashed first).

    Rows whose status is not ok (skipped: already done) are passed through undecoded."""
    if "image_id" not in batch:
        batch = hash_files(batch, protocol)
    out = {k: [] for k in ("image_id", "source_uri", "status", "error", "width", "height", "image")}
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
            continue
        d = decode_image(bytes(data) if data is not None else b"", max_pixels=max_pixels, min_side=min_side)
        out["status"].append(d.status)
        out["error"].append(d.error or "")
        out["width"].append(-1 if d.width is None else d.width)
        out["height"].append(-1 if d.height is None else d.height)
        out["image"].append(d.image if d.image is not None else EMPTY_IMAGE)
    res = {k: np.array(v, dtype=object) if k in ("image_id", "source_uri", "status", "error") else v
           for k, v in out.items()}
    res["width"] = np.array(out["width"], dtype=np.int64)
    res["height"] = np.array(out["height"], dtype=np.int64)
    return res


def file_units(rows: list[list[dict]]) -> list[str]:
    """The `_unit` column for the rows of several inputs (one list of rows per input): the
    input's outcome on its first row, "" on the others."""
    out = []
    for rs in rows:
        st = [r["status"] for r in rs]
        unit = STATUS_SKIPPED if st == [STATUS_SKIPPED] else ("ok" if STATUS_OK in st else "failed")
        out += [unit] + [""] * (len(rs) - 1)
    return out


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


def select_faces(faces, policy: str = "largest", min_score: float = 0.9, min_face_px: float = 32,
                 max_faces: int = 16) -> tuple[str, str | None, int, list[int]]:
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
    return "ok", None, int(len(cand)), [int(i) for i in big]


class AlignFaces:
    """Callable class for `map_batches`: loads MTCNN once per actor, then per batch detects
    faces (one batched MTCNN call per image size), picks faces by policy, refines their
    landmarks on a first upright crop (`refine_passes`, one batched call), aligns, writes PNG
    crops, returns rows of the `faces` table (landmarks = the refined ones the quad uses; bbox and
    det_score from the first pass)."""

    def __init__(self, output: str, run_id: str, size: int = 1024, supersample: int = 4,
                 face_policy: str = "largest", min_score: float = 0.9, min_face_px: float = 32,
                 max_faces: int = 16, device: str = "auto", detect_max_side: int = 1024,
                 mtcnn_min_face: int = 20, mtcnn_thresholds=(0.6, 0.7, 0.7), detect_batch: int = 16,
                 png_compress_level: int = 1, refine_passes: int = 1, torch_threads: int | None = None):
        import torch

        from stmodel.detect import FaceDetector

        if face_policy not in FACE_POLICIES:
            raise ValueError(f"face_policy must be one of {FACE_POLICIES}, got {face_policy!r}")
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.output, self.run_id = output, run_id
        self.size, self.supersample = int(size), int(supersample)
        self.policy, self.min_score, self.min_face_px, self.max_faces = face_policy, float(min_score), \
            float(min_face_px), int(max_faces)
        self.png_level = int(png_compress_level)
        self.refine_passes = int(refine_passes)
        self.detector = FaceDetector(device=device, min_face_size=int(mtcnn_min_face),
                                     thresholds=tuple(mtcnn_thresholds), max_side=detect_max_side,
                                     max_batch=detect_batch)

    def _detect(self, images: list[np.ndarray]) -> list:
        try:
            return self.detector.detect(images)
        except Exception:  # noqa: BLE001 - isolate the image that breaks the batch
            out = []
            for im in images:
                try:
                    out.append(self.detector.detect([im])[0])
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out

    def _select(self, base: dict, faces) -> tuple[list[dict] | None, list[int], int]:
        """(failure rows or None, kept face indices, n_faces) for one decoded image."""
        if isinstance(faces, Exception):
            return [{**base, "status": "align_error",
                     "error": f"face detection failed: {type(faces).__name__}: {faces}"}], [], 0
        status, error, n_faces, keep = select_faces(faces, self.policy, self.min_score, self.min_face_px,
                                                    self.max_faces)
        if status != "ok":
            return [{**base, "status": status, "error": error, "n_faces": n_faces}], [], n_faces
        return None, keep, n_faces

    def _refine(self, images: list[np.ndarray], landmarks: list[np.ndarray]) -> list[np.ndarray]:
        if self.refine_passes <= 0 or not images:
            return landmarks
        try:
            return self.detector.refine(images, landmarks, passes=self.refine_passes)
        except Exception:  # noqa: BLE001 - refinement is an improvement, never a failure
            log.warning("landmark refinement failed, keeping first-pass landmarks: %s", traceback.format_exc())
            return landmarks

    def _align_faces(self, base: dict, image: np.ndarray, faces, keep: list[int], n_faces: int,
                     landmarks: np.ndarray) -> list[dict]:
        from stmodel.align import align_face

        rows = []
        for j, k in enumerate(keep):
            lm = landmarks[j]
            row = {**base, "n_faces": n_faces, "face_index": k, "det_score": float(faces.scores[k]),
                   "bbox": faces.boxes[k], "landmarks": lm}
            try:
                crop, quad = align_face(image, lm, size=self.size, supersample=self.supersample)
                uri = storage.join(self.output, aligned_key(base["image_id"], k))
                storage.write_bytes(uri, encode_png(crop, self.png_level))
                rows.append({**row, "status": "ok", "quad": quad, "aligned_uri": uri})
            except Exception as e:  # noqa: BLE001
                log.warning("align failed for %s face %d: %s", base["source_uri"], k, traceback.format_exc())
                rows.append({**row, "status": "align_error", "error": f"{type(e).__name__}: {e}"})
        return rows

    def __call__(self, batch: dict) -> pa.Table:
        n = len(batch["image_id"])
        bases, todo = [], []
        for i in range(n):
            w, h = int(batch["width"][i]), int(batch["height"][i])
            base = {"image_id": str(batch["image_id"][i]), "source_uri": str(batch["source_uri"][i]),
                    "status": str(batch["status"][i]), "error": str(batch["error"][i]) or None,
                    "width": w if w >= 0 else None, "height": h if h >= 0 else None}
            bases.append(base)
            if base["status"] == STATUS_OK:
                todo.append(i)
        images = {i: np.asarray(batch["image"][i], dtype=np.uint8) for i in todo}
        detections = dict(zip(todo, self._detect([images[i] for i in todo]))) if todo else {}
        rows: dict[int, list[dict]] = {}
        kept: dict[int, tuple[list[int], int]] = {}
        for i, base in enumerate(bases):
            if i not in detections:
                rows[i] = [base]  # decode failure or skipped: one row, status + error as decoded
                continue
            failed, keep, n_faces = self._select(base, detections[i])
            if failed is not None:
                rows[i] = failed
            else:
                kept[i] = (keep, n_faces)
        order = list(kept)
        refined = self._refine([images[i] for i in order],
                               [detections[i].landmarks[kept[i][0]] for i in order])
        for i, lms in zip(order, refined):
            keep, n_faces = kept[i]
            try:
                rows[i] = self._align_faces(bases[i], images[i], detections[i], keep, n_faces, lms)
            except Exception as e:  # noqa: BLE001 - never crash on data
                rows[i] = [{**bases[i], "status": "align_error", "error": f"{type(e).__name__}: {e}"}]
        per_input = [rows[i] for i in range(n)]
        t = faces_table([r for rs in per_input for r in rs], self.run_id)
        return t.append_column(UNIT_COLUMN, pa.array(file_units(per_input), pa.string()))
