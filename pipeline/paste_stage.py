"""Ray Data stage that pastes face crops (edits, reconstructions) back into their source photos.

    rows = attach_faces(rows, faces_root, partitions)   # join on (image_id, face_index): the face's
                                                        # quad, photo URI and size (`faces` table)
    rows = paste(rows, settings_from(section, ...))     # group=face: map_batches; group=photo:
                                                        # groupby(image_id).map_groups

Each call reads a photo once for all of its rows (rows grouped by image_id), checks that its
bytes are still the ones aligned (sha256 = image_id), decodes it at full resolution after EXIF
transpose (the frame the quads are in), and for every composite warps each crop back with
`stmodel.align.paste_back` (only the mask's window inside the quad's box is touched). The
composite keeps the photo's size, its upright orientation and its RGB ICC profile (no EXIF: the
pixels are already upright, and GPS or camera tags are not copied). Composite keys are built
from hex ids only: `<output>/composites/<folder>/<member>.<ext>` for one face (the edit_id, or
`<image_id>_<face>`), the sha256 of the sorted members for a group of faces of one photo.

Per row: `composite_uri`, `psnr_outside` (the composite against the photo outside the union of
the composite's face masks: inf when nothing else was touched) and `psnr_box` (inside this
face's quad bounding box), both on the composite's pixels before the file encoding. A row that
cannot be pasted keeps its other columns and gets a status and a readable error: `read_error`
(the photo could not be read; transient), `paste_error` (no ok face row, changed or
undecodable photo, size mismatch, bad crop; permanent), `write_error` (transient). Rows that
are not ok pass through untouched; every row comes out once.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline import delta, storage
from pipeline.decode import decode_image
from pipeline.errors import JobError
from pipeline.schemas import unsliced
from pipeline.sections import PasteBackSection
from pipeline.status import STATUS_OK, STATUS_PASTE_ERROR, STATUS_READ_ERROR, STATUS_WRITE_ERROR
from stmodel.align import paste_back, paste_mask

log = logging.getLogger("stbatch.paste")

FOLDER = "composites"
EXTENSIONS = {"jpeg": "jpg", "png": "png"}
CROP_PNG = "_crop_png"   # the crop's PNG bytes, when the stage before holds them (edit actor)
# The faces columns the join brings, renamed so they never collide with a job's own columns.
FACE_COLUMNS = {"source_uri": "_photo_uri", "quad": "_quad", "width": "_photo_w", "height": "_photo_h"}
RESULT_COLUMNS = ("composite_uri", "psnr_outside", "psnr_box")
_MEMBER = re.compile(r"^[0-9a-f]{64}(_[0-9]+)?$")


@dataclass(frozen=True)
class PasteSettings:
    """What one paste stage does: the job's `paste_back` section (format, quality, mask, task
    sizes; pipeline.sections.PasteBackSection) and what the job fixes (`settings_from`)."""

    section: PasteBackSection
    output: str                    # dataset root; composites go under <output>/composites/<folder>/
    folder: str                    # edits | reconstructions
    member_columns: tuple          # the columns naming one face's composite: (edit_id,) or (image_id, face_index)
    group_columns: tuple           # with image_id, the rows one group=photo composite holds
    crop_uri_column: str           # where to read the crop when no CROP_PNG bytes came with the row
    schema: pa.Schema | None = None   # the job's table: the rows come out as exactly this (set before `paste`)


def settings_from(section: PasteBackSection, **fixed) -> PasteSettings | None:
    """A job's `paste_back` section and what the job fixes (output, folder, member_columns,
    group_columns, crop_uri_column, schema) -> PasteSettings, or None when paste-back is off.
    The section's values were checked when the settings were parsed."""
    return PasteSettings(section, **fixed) if section.enabled else None


def faces_table_exists(root: str) -> bool:
    return bool(delta.snapshot_uris(root, "faces"))


def _face_rows(batch: pa.Table) -> pa.Table:
    t = unsliced(batch).filter(pc.equal(batch["status"], STATUS_OK))
    cols = {"image_id": pc.cast(t["image_id"], pa.string()), "face_index": pc.cast(t["face_index"], pa.int32())}
    cols.update({new: t[old] for old, new in FACE_COLUMNS.items()})
    return pa.table(cols)


def attach_faces(ds, faces_root: str, partitions: int):
    """`ds` joined (left outer, on image_id and face_index) with the ok rows of the committed
    `faces` table under `faces_root`: the quad, photo URI and size of each row's face."""
    faces = delta.read_snapshot(faces_root, "faces", columns=["image_id", "face_index", "status", *FACE_COLUMNS])
    if faces is None:
        raise JobError(f"paste_back: no committed faces table under {faces_root}")
    faces = faces.map_batches(_face_rows, batch_format="pyarrow")
    return ds.join(faces, "left_outer", num_partitions=max(1, partitions), on=("image_id", "face_index"))


def paste(ds, settings: PasteSettings):
    """The paste stage on rows that carry their faces (`attach_faces`)."""
    if settings.schema is None:
        raise ValueError("paste: settings.schema (the job's table) is not set")
    kw = {"batch_format": "pyarrow", "fn_kwargs": {"settings": settings}, "num_cpus": settings.section.num_cpus}
    if settings.section.group == "photo":  # every face of a photo in one call, whatever the batching before
        return ds.groupby("image_id").map_groups(paste_batch, **kw)
    return ds.map_batches(paste_batch, batch_size=settings.section.batch_size, **kw)


# ---------------------------------------------------------------------------- one batch

def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}"


def _member(row: dict, settings: PasteSettings) -> str:
    name = "_".join(str(row[c]) for c in settings.member_columns)
    if not _MEMBER.match(name):
        raise ValueError(f"cannot name a composite after {name!r} (not a hex id)")
    return name


def composite_key(members: list[str], settings: PasteSettings) -> str:
    """`composites/<folder>/<name>.<ext>`: one member's own id, or the sha256 of a group's
    sorted members (a later run adding a face to the group makes a new file, never overwrites
    the one earlier rows point to)."""
    name = members[0] if len(members) == 1 else hashlib.sha256(",".join(sorted(members)).encode()).hexdigest()
    return storage.safe_key(f"{FOLDER}/{settings.folder}/{name}.{EXTENSIONS[settings.section.format]}")


def _rgb_icc(data: bytes) -> bytes | None:
    """The photo's ICC profile when it describes RGB data (decode_image keeps RGB pixels in the
    photo's own space; a CMYK or gray profile does not describe the RGB composite)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            icc = im.info.get("icc_profile")
    except Exception:  # noqa: BLE001 - the decode reports unreadable bytes
        return None
    return icc if icc and len(icc) >= 20 and icc[16:20] == b"RGB " else None


def encode_composite(rgb: np.ndarray, settings: PasteSettings, icc: bytes | None) -> bytes:
    buf = io.BytesIO()
    extra = {"icc_profile": icc} if icc else {}
    if settings.section.format == "png":
        Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=6, **extra)
    else:
        Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=settings.section.quality, **extra)
    return buf.getvalue()


def _psnr(sse: float, n: int) -> float:
    if sse <= 0 or n <= 0:
        return math.inf
    return float(10.0 * np.log10(255.0 ** 2 / (sse / n)))


def box_of(quad: np.ndarray, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The quad's bounding box (x0, y0, x1, y1), pixel indices, clipped to the photo."""
    x0, y0 = (max(int(np.floor(v)), 0) for v in quad.min(0))
    x1, y1 = (int(np.ceil(v)) + 1 for v in quad.max(0))
    return x0, y0, max(min(x1, hw[1]), x0), max(min(y1, hw[0]), y0)


def composite_psnr(photo: np.ndarray, comp: np.ndarray, quads: list[np.ndarray], settings: PasteSettings
                   ) -> tuple[float, list[float]]:
    """(PSNR outside the union of the faces' masks, PSNR inside each quad's box)."""
    h, w = photo.shape[:2]
    union = np.zeros((h, w), bool)
    for q in quads:
        union |= paste_mask((h, w), q, feather=settings.section.feather, radii=settings.section.radii) > 0
    changed = np.any(comp != photo, axis=2) & ~union
    if changed.any():
        d = comp[changed].astype(np.float64) - photo[changed]
        outside = _psnr(float(np.sum(d * d)), int((~union).sum()) * 3)
    else:
        outside = math.inf
    boxes = []
    for q in quads:
        x0, y0, x1, y1 = box_of(q, (h, w))
        d = comp[y0:y1, x0:x1].astype(np.float64) - photo[y0:y1, x0:x1]
        boxes.append(_psnr(float(np.sum(d * d)), d.size))
    return outside, boxes


def _read_photo(uri: str, image_id: str, size: tuple, settings: PasteSettings):
    """(RGB pixels after EXIF transpose, ICC) or raises (status, error)."""
    try:
        data = storage.read_bytes(uri)
    except Exception as e:  # noqa: BLE001 - any storage failure is these rows' error
        raise _Failed(STATUS_READ_ERROR, f"cannot read the photo {uri}: {_describe(e)}") from None
    if hashlib.sha256(data).hexdigest() != image_id:
        raise _Failed(STATUS_PASTE_ERROR, f"the photo at {uri} is not the one aligned (its sha256 is no longer the "
                                    f"image_id): align it again")
    d = decode_image(data, max_pixels=settings.section.max_pixels, min_side=1)
    if d.status != STATUS_OK:
        raise _Failed(STATUS_PASTE_ERROR, f"cannot decode the photo {uri}: {d.error}")
    img = d.rgb
    if None not in size and (img.shape[1], img.shape[0]) != tuple(size):
        raise _Failed(STATUS_PASTE_ERROR, f"the photo {uri} decodes to {img.shape[1]}x{img.shape[0]}, the faces "
                                    f"table says {size[0]}x{size[1]}")
    return img, _rgb_icc(data)


class _Failed(Exception):
    def __init__(self, status: str, error: str):
        super().__init__(error)
        self.status, self.error = status, error


def _crop(row: dict, settings: PasteSettings) -> np.ndarray:
    data = row.get(CROP_PNG)
    if data is None:
        uri = row.get(settings.crop_uri_column)
        if not uri:
            raise _Failed(STATUS_PASTE_ERROR, f"no crop to paste ({settings.crop_uri_column} is empty)")
        try:
            data = storage.read_bytes(str(uri))
        except Exception as e:  # noqa: BLE001 - this row's error
            raise _Failed(STATUS_READ_ERROR, f"cannot read the crop {uri}: {_describe(e)}") from None
    d = decode_image(bytes(data), max_pixels=settings.section.max_pixels, min_side=1)
    if d.status != STATUS_OK:
        raise _Failed(STATUS_PASTE_ERROR, f"cannot decode the crop: {d.error}")
    return d.rgb


def _paste_photo(rows: list[dict], idx: list[int], settings: PasteSettings, res: dict) -> None:
    """All rows of one photo (`idx` into `rows`, every one ok and with a face): read the photo
    once, then one composite per face (group=face) or per group of faces (group=photo)."""
    r0 = rows[idx[0]]
    try:
        photo, icc = _read_photo(str(r0["_photo_uri"]), str(r0["image_id"]), (r0["_photo_w"], r0["_photo_h"]),
                                 settings)
    except _Failed as f:
        for i in idx:
            res["status"][i], res["error"][i] = f.status, f.error
        return
    groups: dict[tuple, list[int]] = {}
    for i in idx:
        key = (i,) if settings.section.group == "face" else tuple(rows[i].get(c) for c in settings.group_columns)
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        comp, quads, done = photo, [], []
        for i in members:
            try:
                q = np.asarray(rows[i]["_quad"], dtype=np.float64).reshape(4, 2)
                if not np.isfinite(q).all():
                    raise _Failed(STATUS_PASTE_ERROR, "the face's quad is not finite")
                comp = paste_back(comp, _crop(rows[i], settings), q, feather=settings.section.feather,
                                  radii=settings.section.radii)
                quads.append(q)
                done.append(i)
            except _Failed as f:
                res["status"][i], res["error"][i] = f.status, f.error
            except Exception as e:  # noqa: BLE001 - a face that cannot be pasted fails alone
                res["status"][i], res["error"][i] = STATUS_PASTE_ERROR, f"cannot paste the face back: {_describe(e)}"
        if not done:
            continue
        try:
            outside, boxes = composite_psnr(photo, comp, quads, settings)
            uri = storage.join(settings.output, composite_key([_member(rows[i], settings) for i in done], settings))
        except Exception as e:  # noqa: BLE001 - these rows' error
            for i in done:
                res["status"][i] = STATUS_PASTE_ERROR
                res["error"][i] = f"cannot name or score the composite: {_describe(e)}"
            continue
        try:
            storage.write_bytes(uri, encode_composite(comp, settings, icc))
        except Exception as e:  # noqa: BLE001 - transient: the next run pastes again
            for i in done:
                res["status"][i] = STATUS_WRITE_ERROR
                res["error"][i] = f"cannot write the composite {uri}: {_describe(e)}"
            continue
        for i, b in zip(done, boxes):
            res["composite_uri"][i], res["psnr_outside"][i], res["psnr_box"][i] = uri, outside, b


def paste_batch(batch: pa.Table, settings: PasteSettings) -> pa.Table:
    """Ray task: rows with their faces (`attach_faces`) -> the same rows as `settings.schema`
    (the transient columns dropped), with composite_uri / psnr_outside / psnr_box, or a paste
    failure status."""
    n = batch.num_rows
    rows = batch.to_pylist()
    res = {"status": [r["status"] for r in rows], "error": [r.get("error") for r in rows],
           "composite_uri": [None] * n, "psnr_outside": [None] * n, "psnr_box": [None] * n}
    by_photo: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r["status"] != STATUS_OK:
            continue
        if r.get("_quad") is None or not r.get("_photo_uri"):
            res["status"][i], res["error"][i] = STATUS_PASTE_ERROR, (
                f"no ok face row for image_id {r['image_id']} face_index {r['face_index']} in the faces table: "
                f"nothing to paste into")
            continue
        by_photo.setdefault(str(r["image_id"]), []).append(i)
    for idx in by_photo.values():
        _paste_photo(rows, idx, settings, res)
    schema = settings.schema
    if schema is None:
        raise ValueError("paste_batch: settings.schema (the job's table) is not set")
    cols = [pa.array(res[f.name], f.type) if f.name in res else batch[f.name].cast(f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)
