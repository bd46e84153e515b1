"""Paste-back in the jobs: jobs.edit / jobs.invert write whole photos with the face replaced
(pipeline.paste_stage), from photos aligned by jobs.align.

One dataset for the module (align, then invert with metrics + paste_back, then two edit runs):
each Ray job run costs minutes on a small machine. The photos: skimage's astronaut, upright
(400x512) but stored rotated with EXIF orientation 6 and an ICC profile, and two astronauts
side by side in one PNG (two faces)."""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageCms, ImageOps

from jobs.cli import load_config
from pipeline import delta, paste_stage, storage
from pipeline.config import SettingsError, defaults, parse
from pipeline.decode import image_id
from pipeline.errors import JobError
from pipeline.schemas import edits_schema
from pipeline.sections import PasteBackSection
from stmodel.config import get_preset
from tests.test_paste_back import outside_quad

ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _cfg(job, **sets) -> dict:
    declared = getattr(job, "SETTINGS", None) or job.DEFAULTS  # a job before or after its typed settings
    return load_config(declared, None, [f"{k}={v}" for k, v in {"progress": "false", **sets}.items()])


def _photos(folder) -> dict[str, np.ndarray]:
    """name -> the upright RGB pixels (what the quads refer to)."""
    from skimage import data

    a = data.astronaut()
    upright = np.ascontiguousarray(a[:, 56:456])   # 512 high, 400 wide
    exif = Image.Exif()
    exif[0x0112] = 6                              # shown rotated 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(np.rot90(upright, 1).copy()).save(buf, "JPEG", quality=92, exif=exif, icc_profile=ICC)
    storage.write_bytes(storage.join(str(folder), "exif_icc.jpg"), buf.getvalue())
    two = np.concatenate([a, a[:, ::-1]], axis=1)
    buf = io.BytesIO()
    Image.fromarray(two).save(buf, "PNG")
    storage.write_bytes(storage.join(str(folder), "two_faces.png"), buf.getvalue())
    with Image.open(storage.join(str(folder), "exif_icc.jpg")) as im:
        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return {"exif_icc.jpg": shown, "two_faces.png": two}


def _by_photo(t: pa.Table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in t.to_pylist():
        out.setdefault(r["source_uri"].rsplit("/", 1)[-1], []).append(r)
    return out


@pytest.fixture(scope="module")
def ds(ray_local, tmp_path_factory, tiny_checkpoint):
    """Photos aligned (face_policy=all), then inverted with metrics and paste_back (JPEG)."""
    from jobs import align, invert

    ckpt, _ = tiny_checkpoint
    base = tmp_path_factory.mktemp("paste")
    photos = _photos(base / "photos")
    root = str(base / "ds")
    a = align.run(_cfg(align, input=str(base / "photos"), output=root, **{
        "align.size": 64, "align.face_policy": "all", "align.mtcnn_min_face": 40, "align.batch_size": 2}))
    assert a["counts"]["ok"] == 2, a
    inv = invert.run(_cfg(invert, input=root, output=root, **{
        "model.checkpoint": ckpt, "metrics": "true", "metric_weights.allow_random_init": "true",
        "paste_back": "true", "invert.batch_size": 4, "invert.load_batch_size": 4}))
    faces = _by_photo(delta.read_snapshot_arrow(root, "faces"))
    assert [len(faces[n]) for n in ("exif_icc.jpg", "two_faces.png")] == [1, 2]
    return {"base": base, "root": root, "ckpt": ckpt, "photos": photos, "faces": faces, "invert": inv}


def _edit(ds, out: str, **sets) -> tuple[dict, str]:
    """A direction edit of every face, pasted back."""
    from jobs import edit

    d = storage.join(out, "directions", "d.npy")
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(3).standard_normal(get_preset("tiny-32").style_dim).astype(np.float32) * 3)
    storage.write_bytes(d, buf.getvalue())
    res = edit.run(_cfg(edit, latents=ds["root"], output=out, **{
        "model.checkpoint": ds["ckpt"], "metrics": "false", "requests": "null", "sweep.kinds": "[direction]",
        "sweep.direction_uris": f"[{d}]", "sweep.strengths": "[2.0]", "edit.batch_size": 2, **sets}))
    return res, out


@pytest.fixture(scope="module")
def edit_face(ds):
    """One PNG composite per edited face, written into the dataset root itself."""
    return _edit(ds, ds["root"], **{"paste_back.enabled": "true", "paste_back.format": "png"})


def test_edit_composites_one_per_face_keep_size_orientation_icc(ds, edit_face):
    res, out = edit_face
    assert res["counts"] == {"in": 3, "ok": 3, "failed": 0, "skipped": 0}, res
    t = delta.read_snapshot_arrow(out, "edits")
    assert t.schema.names == delta.delta_schema(edits_schema()).names
    rows = t.to_pylist()
    uris = [r["composite_uri"] for r in rows]
    assert len(set(uris)) == 3 and all(u.startswith(storage.join(out, "composites/edits/")) for u in uris)
    for r in rows:
        assert r["composite_uri"].endswith(f"/{r['edit_id']}.png")  # named by the id, never the photo's name
        assert math.isinf(r["psnr_outside"]) and r["psnr_outside"] > 0
        assert np.isfinite(r["psnr_box"]) and r["psnr_box"] > 5
    by_face = {(r["image_id"], r["face_index"]): r for r in rows}
    for name, faces in ds["faces"].items():
        photo = ds["photos"][name]
        for f in faces:
            r = by_face[(f["image_id"], f["face_index"])]
            with Image.open(r["composite_uri"]) as im:
                assert im.size == (photo.shape[1], photo.shape[0])   # upright: 400x512 for the EXIF photo
                assert im.info.get("icc_profile") == (ICC if name == "exif_icc.jpg" else None)
                assert "exif" not in im.info
                comp = np.asarray(im.convert("RGB"))
            quad = np.asarray(f["quad"], dtype=np.float64)
            out_q = outside_quad(photo.shape, quad)
            np.testing.assert_array_equal(comp[out_q], photo[out_q])    # untouched outside the quad
            assert np.abs(comp[~out_q].astype(int) - photo[~out_q]).mean() > 2   # the edit is in
    # the rows refer to their own photo: the two faces of the PNG are two files, each one face changed
    two = [by_face[(f["image_id"], f["face_index"])]["composite_uri"] for f in ds["faces"]["two_faces.png"]]
    assert len(set(two)) == 2


def test_edit_group_photo_one_composite_for_two_faces(ds):
    res, out = _edit(ds, str(ds["base"] / "edit_photo"), **{"paste_back.enabled": "true", "paste_back.group": "photo",
                                          "paste_back.quality": 90})
    assert res["counts"] == {"in": 3, "ok": 3, "failed": 0, "skipped": 0}, res
    rows = {(r["image_id"], r["face_index"]): r for r in delta.read_snapshot_arrow(out, "edits").to_pylist()}
    two = [rows[(f["image_id"], f["face_index"])] for f in ds["faces"]["two_faces.png"]]
    assert two[0]["composite_uri"] == two[1]["composite_uri"] and two[0]["composite_uri"].endswith(".jpg")
    one = rows[(ds["faces"]["exif_icc.jpg"][0]["image_id"], 0)]
    assert one["composite_uri"] != two[0]["composite_uri"]
    assert len(storage.list_files(storage.join(out, "composites"))) == 2
    photo = ds["photos"]["two_faces.png"]
    with Image.open(two[0]["composite_uri"]) as im:
        assert im.format == "JPEG" and im.size == (photo.shape[1], photo.shape[0])
        comp = np.asarray(im.convert("RGB")).astype(int)
    for f in ds["faces"]["two_faces.png"]:   # both faces changed in the one file
        inside = ~outside_quad(photo.shape, np.asarray(f["quad"], dtype=np.float64))
        assert np.abs(comp[inside] - photo[inside]).mean() > 2
    assert all(math.isinf(r["psnr_outside"]) for r in two)


def test_invert_metrics_paste_back_writes_reconstruction_composites(ds):
    assert ds["invert"]["counts"] == {"in": 3, "ok": 3, "failed": 0, "skipped": 0}, ds["invert"]
    t = delta.read_snapshot_arrow(ds["root"], "latents")
    by_face = {(r["image_id"], r["face_index"]): r for r in t.to_pylist()}
    for name, faces in ds["faces"].items():
        photo = ds["photos"][name]
        for f in faces:
            r = by_face[(f["image_id"], f["face_index"])]
            assert r["composite_uri"] == storage.join(
                ds["root"], f"composites/reconstructions/{f['image_id']}_{f['face_index']}.jpg")
            assert math.isinf(r["psnr_outside"]) and np.isfinite(r["psnr_box"])
            with Image.open(r["composite_uri"]) as im:
                assert im.format == "JPEG" and im.size == (photo.shape[1], photo.shape[0])
                assert im.info.get("icc_profile") == (ICC if name == "exif_icc.jpg" else None)
                comp = np.asarray(im.convert("RGB")).astype(int)
            out_q = outside_quad(photo.shape, np.asarray(f["quad"], dtype=np.float64))
            assert np.abs(comp[out_q] - photo[out_q]).mean() < 3   # the same photo, the same way up (JPEG)


def test_report_shows_whole_photos_before_and_after(ds, edit_face):
    from jobs import report

    res = report.run(_cfg(report, input=ds["root"], **{"report.thumb_format": "jpeg"}))
    html = open(res["extra"]["report"]).read()
    # latents (3 reconstructions) and edits (3 edits): photo + composite thumbnails beside the crops
    assert html.count("Whole photos: before | after (first 3 of 3 composites)") == 1          # latents
    assert html.count("Whole photos: before | after (first 3 of 3 edits pasted back)") == 1   # edits
    assert html.count('alt="composite (after)"') == 3 and html.count('alt="after: ') == 3
    print("photos before:", html.count('alt="photo (before)"'))
    assert html.count('alt="photo (before)"') >= 4
    assert res["extra"]["missing_images"] == 0


def test_paste_back_settings_errors_before_anything_runs(tmp_path, tiny_checkpoint):
    from jobs import edit, invert
    from tests.conftest import write_crops

    write_crops(tmp_path / "crops", 2)
    base = {"model.checkpoint": tiny_checkpoint[0], "metric_weights.allow_random_init": "true"}
    with pytest.raises(SettingsError, match="metrics=true"):
        _cfg(invert, input=str(tmp_path / "crops"), output=str(tmp_path / "o"), paste_back="true", **base)
    cfg = _cfg(invert, input=str(tmp_path / "crops"), output=str(tmp_path / "o"), paste_back="true",
               metrics="true", **base)
    assert any("no committed faces table" in m for m in invert.check(cfg))  # the CLI: exit 2 before Ray
    with pytest.raises(JobError, match="no committed faces table"):
        invert.run(cfg)
    with pytest.raises(JobError, match="paste_back.faces"):
        edit.run(_cfg(edit, latents=str(tmp_path / "crops"), output=str(tmp_path / "o"), paste_back="true",
                      metrics="false", **{"model.checkpoint": tiny_checkpoint[0]}))
    assert not (tmp_path / "o").exists()


def test_paste_back_section_ranges_and_switch():
    """The paste-back settings are checked when parsed (nothing left for the stage to check)."""
    with pytest.raises(SettingsError) as e:
        parse(PasteBackSection, {"quality": 0, "feather": 0, "radii": [0.8, 1.5], "batch_size": 0,
                                 "format": "gif", "group": "faces"})
    assert sorted(m.split(":")[0] for m in e.value.errors) == ["batch_size", "feather", "format", "group",
                                                               "quality", "radii"]
    fixed = {"output": "o", "folder": "edits", "member_columns": ("edit_id",), "group_columns": (),
             "crop_uri_column": "output_uri"}
    assert paste_stage.settings_from(defaults(PasteBackSection), **fixed).section.quality == 95  # given: on
    assert paste_stage.settings_from(parse(PasteBackSection, {"enabled": False}), **fixed) is None
    from jobs.settings.invert import Settings

    assert paste_stage.settings_from(defaults(Settings).paste_back, **fixed) is None  # not given: off
    on = parse(Settings, {"metrics": True, "paste_back": True}).paste_back
    assert on.enabled and on.quality == 95 and on.radii == (0.8, 0.9)


def test_paste_batch_fails_rows_not_the_batch(tmp_path):
    """Unreadable photo, a photo changed since alignment, no face row: each its row's status and
    error; a row that is not ok passes through; every row comes out once."""
    from pipeline.images import encode_png
    from pipeline.schemas import make_table

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    data = encode_png(photo)
    storage.write_bytes(str(tmp_path / "p.png"), data)
    storage.write_bytes(str(tmp_path / "changed.png"), encode_png(photo[::-1].copy()))
    iid = image_id(data)
    quad = [[16.0, 16.0], [16.0, 48.0], [48.0, 48.0], [48.0, 16.0]]
    crop = encode_png(np.full((32, 32, 3), 200, np.uint8))
    cases = [  # (edit_id, image_id, status, photo uri, quad) -> expected status
        ("a" * 64, iid, "ok", str(tmp_path / "p.png"), quad, "ok"),
        ("b" * 64, "1" * 64, "ok", str(tmp_path / "missing.png"), quad, "read_error"),
        ("c" * 64, "2" * 64, "ok", str(tmp_path / "changed.png"), quad, "paste_error"),
        ("d" * 64, iid, "ok", None, None, "paste_error"),
        ("e" * 64, iid, "bad_request", None, None, "bad_request"),
    ]
    n = len(cases)
    t = make_table({"edit_id": [c[0] for c in cases], "image_id": [c[1] for c in cases], "face_index": [0] * n,
                    "status": [c[2] for c in cases], "error": [None] * n}, edits_schema(), "run")
    t = t.append_column(paste_stage.CROP_PNG, pa.array([crop] * n, pa.binary()))
    t = t.append_column("_photo_uri", pa.array([c[3] for c in cases], pa.string()))
    t = t.append_column("_quad", pa.array([c[4] for c in cases], pa.list_(pa.list_(pa.float32()))))
    t = t.append_column("_photo_w", pa.array([80] * n, pa.int32())).append_column("_photo_h", pa.array([64] * n,
                                                                                                     pa.int32()))
    s = paste_stage.settings_from(parse(PasteBackSection, {"format": "png"}), output=str(tmp_path / "out"),
                                  folder="edits", member_columns=("edit_id",), group_columns=(),
                                  crop_uri_column="output_uri")
    got = paste_stage.paste_batch(t, dataclasses.replace(s, schema=edits_schema()))
    assert got.schema == edits_schema() and got.num_rows == n
    rows = got.to_pylist()
    assert [r["status"] for r in rows] == [c[5] for c in cases]
    assert "cannot read the photo" in rows[1]["error"] and "not the one aligned" in rows[2]["error"]
    assert "no ok face row" in rows[3]["error"] and rows[4]["error"] is None
    assert [r["composite_uri"] is not None for r in rows] == [True, False, False, False, False]
    with Image.open(rows[0]["composite_uri"]) as im:
        comp = np.asarray(im)
    out_q = outside_quad(photo.shape, np.asarray(quad))
    np.testing.assert_array_equal(comp[out_q], photo[out_q])
    assert math.isinf(rows[0]["psnr_outside"]) and rows[0]["psnr_box"] < 20


def test_a_table_gains_the_columns_its_schema_gained(tmp_path):
    """An edits table written before the composite columns existed reads them (null) once a run
    of the new schema commits."""
    from deltalake import DeltaTable, Schema

    old = pa.schema([f for f in edits_schema() if f.name not in paste_stage.RESULT_COLUMNS])
    root = str(tmp_path / "ds")
    DeltaTable.create(str(tmp_path / "ds" / "edits"), schema=Schema.from_arrow(delta.delta_schema(old)))
    dt = delta._ensure_table(root, "edits", edits_schema())
    assert [f.name for f in dt.schema().fields] == [f.name for f in delta.delta_schema(old)] + list(
        paste_stage.RESULT_COLUMNS)
    assert delta._ensure_table(root, "edits", edits_schema()).version() == dt.version()  # nothing more to add
