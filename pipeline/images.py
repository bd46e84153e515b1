"""Image helpers shared by the stages: PNG encoding, the encoder's input transform, and the
loading of aligned crops into model inputs (one read per crop, hashing on the way)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.decode import decode_image
from pipeline.decode import image_id as hash_image_id
from pipeline.inputs import unread_id
from pipeline.status import STATUS_OK


def encode_png(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def to_model_input(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xSxS in [-1, 1] (the official transforms: PIL bilinear resize,
    normalise with mean 0.5 / std 0.5)."""
    im = Image.fromarray(rgb, "RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1)
    return x * (2.0 / 255.0) - 1.0


def read_crops(batch: dict) -> dict:
    """`uri` rows (the files of a plain folder of crops) -> work rows, one face each: the bytes
    are read here once and kept for the load stage, image_id = their sha256. A file that cannot
    be read (gone since the listing, no permission) is a `read_error` row keyed by its URI
    (pipeline.inputs.unread_id), so it is counted and the next run tries it again."""
    uris = [str(u) for u in batch["uri"]]
    n = len(uris)
    ids, status = np.empty(n, dtype=object), np.array([STATUS_OK] * n, dtype=object)
    error, data = np.array([None] * n, dtype=object), np.array([None] * n, dtype=object)
    for i, uri in enumerate(uris):
        try:
            data[i] = storage.read_bytes(uri)
            ids[i] = hash_image_id(data[i])
        except Exception as e:  # noqa: BLE001 - any storage failure is this row's error
            ids[i], status[i], error[i] = unread_id(uri), "read_error", f"cannot read {uri}: {type(e).__name__}: {e}"
    uris_arr = np.array(uris, dtype=object)
    return {"image_id": ids, "face_index": np.zeros(n, dtype=np.int32), "source_uri": uris_arr,
            "aligned_uri": uris_arr, "status": status, "error": error, "bytes": data}


def load_crops(batch: dict, input_size: int | None, target_size: int | None, max_pixels: int,
               formats: list[str] | None = None, multi_frame: str = "refuse") -> dict:
    """Decode aligned crops (from a `bytes` column when the read stage has them, else from
    `aligned_uri`) into `image` (encoder input, when `input_size` is set) and `target` (the crop
    at the reconstruction's size, when `target_size` is set). Rows whose `status` is not ok are
    passed through untouched; a crop that cannot be read or decoded becomes that row's status
    (read_error, or pipeline.decode's: decode_error, too_large, unsupported_format, multi_frame;
    `formats` and `multi_frame` as there, its defaults when not given)."""
    n = len(batch["aligned_uri"])
    status = np.array(batch["status"], dtype=object) if "status" in batch else np.array([STATUS_OK] * n, object)
    error = np.array(batch["error"], dtype=object) if "error" in batch else np.array([None] * n, object)
    image = np.zeros((n, 3, input_size, input_size), dtype=np.float32) if input_size else None
    target = np.zeros((n, 3, target_size, target_size), dtype=np.float32) if target_size else None
    data_col = batch.get("bytes")
    for i, uri in enumerate(batch["aligned_uri"]):
        if status[i] != STATUS_OK:
            continue
        if data_col is not None and data_col[i] is not None:
            data = bytes(data_col[i])
        else:
            try:
                data = storage.read_bytes(str(uri))
            except Exception as e:  # noqa: BLE001 - any storage failure is this row's error
                status[i], error[i] = "read_error", f"cannot read {uri}: {type(e).__name__}: {e}"
                continue
        d = decode_image(data, max_pixels=max_pixels, min_side=1, formats=formats, multi_frame=multi_frame)
        if d.status != STATUS_OK:
            status[i], error[i] = d.status, d.error
            continue
        # image / target exist exactly when their size is set
        if image is not None and input_size:
            image[i] = to_model_input(d.rgb, input_size)
        if target is not None and target_size:
            target[i] = to_model_input(d.rgb, target_size)
    out = {k: v for k, v in batch.items() if k != "bytes"}
    out.update(status=status, error=error)
    if image is not None:
        out["image"] = image
    if target is not None:
        out["target"] = target
    return out
