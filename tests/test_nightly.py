"""Nightly runs cost what is new: finished keys never enter the pipeline, an invert over an align
output reads only the faces files committed since the version its last run consumed, align knows
a committed photo by its listing without reading it, and a commit opens only the files that can
hold a key it replaces. The done check keeps its meaning (each case below)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from jobs import align, invert
from jobs.cli import load_config
from pipeline import delta, runner
from pipeline.decode import image_id
from pipeline.runner import DoneSet, JobRun, TableSpec
from pipeline.schemas import FACES_SCHEMA, faces_table
from tests.conftest import write_crops
from tests.test_invert import _cfg
from tests.test_invert import _table as _latents

FACES = TableSpec("faces", FACES_SCHEMA, ("image_id", "face_index"), ("image_id",))


def _commit_faces(root, files, statuses=None):
    """One align-like commit of faces rows naming `files` as aligned crops; returns the rows."""
    rows = []
    for i, f in enumerate(files):
        iid = image_id(open(f, "rb").read())
        rows.append({"image_id": iid, "source_uri": f"s3://raw/{os.path.basename(f)}.jpg",
                     "status": (statuses or {}).get(i, "ok"), "n_faces": 1, "face_index": 0, "aligned_uri": f})
    run = JobRun(root, "align")
    run.commit({FACES: run.write_small(FACES, faces_table(rows, run.run_id))}, {"in": len(rows)})
    return rows


def _done_set(ray, rows, key, retry_failed=False):
    t = pa.table({k: [r[i] for r in rows] for i, k in enumerate([*key, "status"])})
    t = t.append_column(runner.DONE_PATH, pa.array([f"/t/part-{i}.parquet" for i in range(t.num_rows)]))
    refs = [ray.put(runner._done_keys(t, list(key), retry_failed))]
    return DoneSet(refs, list(key))


def test_done_set_keeps_the_meaning_of_done(ray_local):
    """ok -> done; permanent failure -> done unless retry_failed; transient -> not done; a key
    with one ok row and one transient failure row -> not done (attempted again)."""
    rows = [("a", "ok"), ("b", "no_face"), ("c", "read_error"), ("d", "ok"), ("d", "align_error"), ("e", "ok"),
            ("e", "ok")]
    work = pa.table({"image_id": ["a", "b", "c", "d", "e", "new"], "status": ["ok"] * 6})
    kept = _done_set(ray_local, rows, ("image_id",))(work)
    assert kept["image_id"].to_pylist() == ["c", "d", "new"]
    kept = _done_set(ray_local, rows, ("image_id",), retry_failed=True)(work)
    assert kept["image_id"].to_pylist() == ["b", "c", "d", "new"]
    # the files the commit must open: those of the keys attempted again, and only those
    assert _done_set(ray_local, rows, ("image_id",)).retried_paths("/t") == ["part-2.parquet", "part-3.parquet",
                                                                             "part-4.parquet"]
    # a composite key
    rows2 = [("a", 0, "ok"), ("a", 1, "lost")]
    t = pa.table({"image_id": ["a", "a", "a"], "face_index": [0, 1, 2], "status": ["ok"] * 3})
    assert _done_set(ray_local, rows2, ("image_id", "face_index"))(t)["face_index"].to_pylist() == [1, 2]


def _watch_plans(monkeypatch):
    """The files each commit's replacement plan opens (plan_replacements runs in the driver)."""
    seen = []
    real = delta.plan_replacements

    def spy(output, table, schema, key, snapshot, ours, *a, **kw):
        seen.append((table, list(snapshot)))
        return real(output, table, schema, key, snapshot, ours, *a, **kw)

    monkeypatch.setattr(delta, "plan_replacements", spy)
    return seen


def test_nightly_invert_reads_only_new_faces(ray_local, tmp_path, tiny_checkpoint, monkeypatch):
    ckpt, _ = tiny_checkpoint
    root = str(tmp_path / "ds")
    old = write_crops(tmp_path / "old", 4, seed=21)
    _commit_faces(root, old)
    r1 = invert.run(_cfg(root, root, ckpt))
    assert r1["counts"] == {"in": 4, "ok": 4, "failed": 0, "skipped": 0}
    assert r1["extra"]["scan"]["mode"] == "full"
    # the old crops are gone: a run that opened one would write a read_error
    for f in old:
        os.remove(f)
    new = write_crops(tmp_path / "new", 2, seed=22)
    _commit_faces(root, new)
    seen = _watch_plans(monkeypatch)
    r2 = invert.run(_cfg(root, root, ckpt))
    assert r2["counts"] == {"in": 2, "ok": 2, "failed": 0, "skipped": 0}, r2
    assert r2["extra"]["scan"]["mode"] == "incremental"
    assert seen == [("latents", [])], "a commit that replaces no old key opened old data files"
    t = _latents(root)
    assert t.num_rows == 6 and set(t["status"].to_pylist()) == {"ok"}
    # nothing new: nothing read, nothing committed but the consumed version (unchanged: no commit)
    v = delta.open_table(root, "latents").version()
    r3 = invert.run(_cfg(root, root, ckpt))
    assert r3["counts"] == {"in": 0, "ok": 0, "failed": 0, "skipped": 0}
    assert delta.open_table(root, "latents").version() == v
    # full_scan reads everything again: every face is done, none is opened
    r4 = invert.run(_cfg(root, root, ckpt, full_scan="true"))
    assert r4["counts"] == {"in": 6, "ok": 0, "failed": 0, "skipped": 6}


def test_nightly_retries_transient_failures_outside_the_new_files(ray_local, tmp_path, tiny_checkpoint,
                                                                   monkeypatch):
    """A face whose latents row is a transient failure is tried again although its faces row is
    old; only the small failure file is opened by the commit, never the file of good codes."""
    ckpt, _ = tiny_checkpoint
    root = str(tmp_path / "ds")
    files = write_crops(tmp_path / "c", 3, seed=23)
    _commit_faces(root, files)
    hidden = files[1] + ".away"
    os.rename(files[1], hidden)
    r1 = invert.run(_cfg(root, root, ckpt))
    assert r1["counts"] == {"in": 3, "ok": 2, "failed": 1, "skipped": 0}
    os.rename(hidden, files[1])
    snap = delta.snapshot(root, "latents")
    failing = [p for p, ok in zip(snap.paths, snap.all_ok) if not ok]
    assert len(failing) == 1 and len(snap.paths) == 2, "failures go to a file of their own"
    seen = _watch_plans(monkeypatch)
    r2 = invert.run(_cfg(root, root, ckpt))
    assert r2["counts"] == {"in": 1, "ok": 1, "failed": 0, "skipped": 0}, r2
    assert seen == [("latents", failing)]
    t = _latents(root)
    assert t.num_rows == 3 and set(t["status"].to_pylist()) == {"ok"}


def test_done_set_actor_path(ray_local, tmp_path, tiny_checkpoint, monkeypatch):
    """Above DONE_SET_ACTOR_ROWS committed rows the done set lives in one actor: same result."""
    ckpt, _ = tiny_checkpoint
    monkeypatch.setattr(runner, "DONE_SET_ACTOR_ROWS", 0)
    crops = tmp_path / "c"
    write_crops(crops, 3, seed=24)
    out = str(tmp_path / "ds")
    assert invert.run(_cfg(str(crops), out, ckpt))["counts"] == {"in": 3, "ok": 3, "failed": 0, "skipped": 0}
    write_crops(crops, 5, seed=24)
    assert invert.run(_cfg(str(crops), out, ckpt))["counts"] == {"in": 5, "ok": 2, "failed": 0, "skipped": 3}


def _align_cfg(inp, out, **over):
    sets = [f"input={inp}", f"output={out}", "align.size=64", "align.batch_size=2", "align.decode_batch_size=2",
            "progress=false", "align.min_face_px=8"]
    sets += [f"{k}={v}" for k, v in over.items()]
    return load_config(align.SETTINGS, None, sets)


def _photo(path, seed):
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    img = data.astronaut()[::2, ::2].copy()
    img[:8] = rng.integers(0, 255, img[:8].shape, dtype=np.uint8)  # distinct bytes per photo
    Image.fromarray(img).save(path, format="PNG")


def test_nightly_align_skips_committed_photos_unread(ray_local, tmp_path):
    """A committed photo is known by its URI, size and mtime: its bytes are not read again (its
    content is replaced here by other bytes of the same size and mtime, which a read would turn
    into a new image). A changed file is read; verify=hash reads everything."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        _photo(photos / f"p{i}.png", i)
    out = str(tmp_path / "ds")
    r1 = align.run(_align_cfg(str(photos), out))
    assert r1["counts"]["in"] == 3 and r1["counts"]["skipped"] == 0
    faces = delta.read_snapshot_arrow(out, "faces")
    assert all(s is not None for s in faces["source_size"].to_pylist())
    assert all(str(t).startswith("mtime:") for t in faces["source_etag"].to_pylist())
    # p0 keeps its size and mtime but not its bytes: never read, so never noticed
    st = os.stat(photos / "p0.png")
    (photos / "p0.png").write_bytes(b"\0" * st.st_size)
    os.utime(photos / "p0.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    _photo(photos / "p3.png", 3)
    r2 = align.run(_align_cfg(str(photos), out))
    assert r2["counts"] == {"in": 4, "ok": r2["counts"]["ok"], "failed": r2["counts"]["failed"], "skipped": 3}
    assert r2["counts"]["ok"] + r2["counts"]["failed"] == 1
    assert "decode_error" not in delta.read_snapshot_arrow(out, "faces")["status"].to_pylist()
    # verify=hash reads every file: the zeroed p0 is a new image, a decode_error
    r3 = align.run(_align_cfg(str(photos), out, verify="hash"))
    assert r3["counts"]["skipped"] == 3 and r3["counts"]["failed"] == 1
    assert "decode_error" in delta.read_snapshot_arrow(out, "faces")["status"].to_pylist()


@pytest.mark.parametrize("job,sets,message", [
    ("invert", ["input={missing}", "output={out}", "model.preset=tiny-32"], "does not exist"),
    ("align", ["input={missing}", "output={out}"], "does not exist"),
    ("invert", ["input={empty}", "output={out}"], "model.checkpoint"),
])
def test_bad_schedule_input_stops_before_anything_runs(tmp_path, job, sets, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    fmt = {"missing": str(tmp_path / "no_such_root"), "out": str(tmp_path / "out"), "empty": str(empty)}
    p = subprocess.run([sys.executable, "-m", f"jobs.{job}", *[a for s in sets for a in ("--set", s.format(**fmt))]],
                       capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists(), "a refused run wrote under its output"


def test_spill_past_the_disk_limit_stops_with_a_clear_error(capsys):
    """When Ray refuses to spill past ray.spill_disk_limit (OutOfDiskError, which Ray Data
    re-raises wrapped in its own errors) the job stops with exit 3 and a line that says what
    happened and what to do. (Whether a given plan reaches Ray's refusal or its fallback
    allocation first depends on timing, so the refusal is raised here as Ray raises it.)"""
    from ray.exceptions import OutOfDiskError

    from jobs.cli import main

    def run(cfg):
        try:
            raise OutOfDiskError("Local disk is full")
        except OutOfDiskError as e:
            raise RuntimeError("an exception was raised from a task of operator MapBatches") from e

    with pytest.raises(SystemExit) as ex:
        main("invert", "spill test", invert.SETTINGS, run, use_ray=False,
             argv=["--set", "ray.spill_disk_limit=0.5", "--quiet"])
    assert ex.value.code == 3
    err = capsys.readouterr().err
    assert "ray.spill_disk_limit=0.5" in err and "Nothing was committed" in err

    def other(cfg):
        raise RuntimeError("not a disk problem")

    with pytest.raises(RuntimeError, match="not a disk problem"):
        main("invert", "spill test", invert.SETTINGS, other, use_ray=False, argv=["--quiet"])
