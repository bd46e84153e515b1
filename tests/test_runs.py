"""Runs on Delta tables: retries replace earlier rows, overlapping runs lose and duplicate
nothing (local folder and S3 through moto's server with conditional put), conflicting commits
are recomputed on top of the winner."""
from __future__ import annotations

import os
import threading

import numpy as np
import pyarrow as pa
import pytest

from jobs import invert
from pipeline import delta
from pipeline.decode import image_id
from pipeline.runner import JobRun, TableSpec
from pipeline.schemas import FACES_SCHEMA, faces_table, latents_schema, make_table
from tests.conftest import write_crops
from tests.test_invert import _cfg
from tests.test_invert import _table as _latents

FACES = TableSpec("faces", FACES_SCHEMA, ("image_id", "face_index"), ("image_id",))


def _assert_unique(t):
    keys = list(zip(t["image_id"].to_pylist(), t["face_index"].to_pylist()))
    assert len(keys) == len(set(keys)), "a key appears twice in the snapshot"
    return keys


def _commit_faces(root, files, missing=()):
    """A committed faces table naming `files` as aligned crops (those in `missing` do not exist)."""
    rows = []
    for i, f in enumerate(files):
        iid = image_id(open(f, "rb").read())
        uri = f + ".gone" if i in missing else f
        rows.append({"image_id": iid, "source_uri": f"s3://raw/p{i}.jpg", "status": "ok", "n_faces": 1,
                     "face_index": 0, "aligned_uri": uri})
    run = JobRun(root, "align")
    run.commit({FACES: run.write_small(FACES, faces_table(rows, run.run_id))}, {"in": len(rows)})
    return rows


def test_transient_failure_is_retried_and_replaced(ray_local, tmp_path, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    root = str(tmp_path / "ds")
    files = write_crops(tmp_path / "src", 3, seed=11)
    _commit_faces(root, files, missing={1})
    r1 = invert.run(_cfg(root, root, ckpt))
    assert r1["counts"] == {"in": 3, "ok": 2, "failed": 1, "skipped": 0}
    t1 = _latents(root)
    assert sorted(t1["status"].to_pylist()) == ["ok", "ok", "read_error"]
    # the crop appears (the S3 hiccup is over): the faces table now names the real file
    _commit_faces(root, files)
    r2 = invert.run(_cfg(root, root, ckpt))
    assert r2["counts"] == {"in": 3, "ok": 1, "failed": 0, "skipped": 2}
    t2 = _latents(root)
    assert len(_assert_unique(t2)) == 3 and set(t2["status"].to_pylist()) == {"ok"}
    retried = image_id(open(files[1], "rb").read())
    row = [r for r in t2.to_pylist() if r["image_id"] == retried][0]
    assert row["run_id"] == r2["run_id"] and row["w_plus"] is not None
    hist = delta.open_table(root, "latents").history()
    assert hist[0]["run_id"] == r2["run_id"] and hist[0]["job"] == "invert"


def test_permanent_failure_skipped_unless_retry_failed(ray_local, tmp_path, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    crops = tmp_path / "c"
    write_crops(crops, 2, seed=12)
    (crops / "junk.png").write_bytes(b"not an image")
    out = str(tmp_path / "ds")
    assert invert.run(_cfg(str(crops), out, ckpt))["counts"] == {"in": 3, "ok": 2, "failed": 1, "skipped": 0}
    assert invert.run(_cfg(str(crops), out, ckpt))["counts"] == {"in": 3, "ok": 0, "failed": 0, "skipped": 3}
    r = invert.run(_cfg(str(crops), out, ckpt, retry_failed="true"))
    assert r["counts"] == {"in": 3, "ok": 0, "failed": 1, "skipped": 2}
    t = _latents(out)
    assert len(_assert_unique(t)) == 3
    bad = [x for x in t.to_pylist() if x["status"] == "decode_error"]
    assert len(bad) == 1 and bad[0]["run_id"] == r["run_id"]


def _overlapping(inp, out, ckpt):
    """Two runs of the job at once in this driver (two Ray Data plans on the 2-CPU test cluster:
    each inversion actor takes half a CPU so the read tasks of both plans still get one)."""
    results, errors = [], []

    def go():
        try:
            results.append(invert.run(_cfg(inp, out, ckpt, **{"invert.num_cpus": 0.5})))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert not errors, errors
    return results


@pytest.mark.slow
def test_two_runs_at_once_local_then_third_skips(ray_local, tmp_path, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    write_crops(tmp_path / "c", 6, seed=13)
    out = str(tmp_path / "ds")
    results = _overlapping(str(tmp_path / "c"), out, ckpt)
    assert all(r["counts"]["in"] == 6 for r in results)
    t = _latents(out)
    assert len(_assert_unique(t)) == 6 and set(t["status"].to_pylist()) == {"ok"}
    assert invert.run(_cfg(str(tmp_path / "c"), out, ckpt))["counts"]["skipped"] == 6


@pytest.mark.slow
def test_two_runs_at_once_on_s3(ray_local, s3_bucket, tmp_path, tiny_checkpoint):
    import s3fs

    ckpt, _ = tiny_checkpoint
    fs = s3fs.S3FileSystem()
    for f in write_crops(tmp_path / "c", 5, seed=14):
        fs.put(f, f"{s3_bucket[5:]}/crops/{os.path.basename(f)}")
    out = f"{s3_bucket}/ds"
    _overlapping(f"{s3_bucket}/crops", out, ckpt)
    t = _latents(out)
    assert len(_assert_unique(t)) == 5
    assert invert.run(_cfg(f"{s3_bucket}/crops", out, ckpt))["counts"]["skipped"] == 5


def _latent_rows(ids, run_id, status="ok"):
    n = len(ids)
    return make_table({"image_id": ids, "face_index": [0] * n, "status": [status] * n},
                      latents_schema(2, 4), run_id, w_plus=np.ones((n, 2, 4), np.float32), ok=np.ones(n, bool))


LAT = TableSpec("latents", latents_schema(2, 4), ("image_id", "face_index"))


def test_commit_race_is_recomputed_on_top_of_the_winner(ray_local, tmp_path, monkeypatch):
    """Run B read the table before run A committed; B's first commit attempt loses the race,
    and its retry replaces A's rows of the keys both wrote: every key once, B's rows newest."""
    out = str(tmp_path / "ds")
    a, b = JobRun(out, "invert"), JobRun(out, "invert")
    ra = a.write_small(LAT, _latent_rows(["k1", "k2", "k3"], a.run_id))
    rb = b.write_small(LAT, _latent_rows(["k2", "k3", "k4"], b.run_id))
    real = delta._ensure_table
    stale = {}

    def ensure(output, table, schema):
        dt = real(output, table, schema)
        if "first" not in stale:  # B opens the table, then A commits before B does
            stale["first"] = dt
            a.commit({LAT: ra}, {"in": 3, "ok": 3})
        return dt

    monkeypatch.setattr(delta, "_ensure_table", ensure)
    b.commit({LAT: rb}, {"in": 3, "ok": 3})
    monkeypatch.undo()
    t = _latents(out)
    rows = {r["image_id"]: r["run_id"] for r in t.to_pylist()}
    assert sorted(rows) == ["k1", "k2", "k3", "k4"] and t.num_rows == 4
    assert rows["k1"] == a.run_id and {rows[k] for k in ("k2", "k3", "k4")} == {b.run_id}
    hist = delta.open_table(out, "latents").history()
    assert [h.get("run_id") for h in hist[:2]] == [b.run_id, a.run_id]


def test_duplicates_within_a_run_are_published_once(ray_local, tmp_path):
    out = str(tmp_path / "ds")
    run = JobRun(out, "invert")
    r1 = run.write_small(LAT, _latent_rows(["k1", "k2"], run.run_id))
    r2 = run.write_small(LAT, _latent_rows(["k2", "k2", "k3"], run.run_id))
    r1.files += r2.files
    run.commit({LAT: r1}, {"in": 5})
    t = _latents(out)
    assert sorted(t["image_id"].to_pylist()) == ["k1", "k2", "k3"]


def test_faces_retry_replaces_every_row_of_the_image(ray_local, tmp_path):
    """An image that failed (one row, no face index) and is retried with two faces: the failed
    row goes, both faces stay, other images untouched."""
    out = str(tmp_path / "ds")
    first = JobRun(out, "align")
    rows = [{"image_id": "a" * 64, "source_uri": "x", "status": "align_error", "error": "boom"},
            {"image_id": "b" * 64, "source_uri": "y", "status": "ok", "face_index": 0}]
    first.commit({FACES: first.write_small(FACES, faces_table(rows, first.run_id))}, {"in": 2})
    second = JobRun(out, "align")
    retry = [{"image_id": "a" * 64, "source_uri": "x", "status": "ok", "face_index": i} for i in (0, 1)]
    second.commit({FACES: second.write_small(FACES, faces_table(retry, second.run_id))}, {"in": 1})
    t = delta.read_snapshot_arrow(out, "faces")
    got = sorted((r["image_id"][0], r["face_index"], r["status"]) for r in t.to_pylist())
    assert got == [("a", 0, "ok"), ("a", 1, "ok"), ("b", 0, "ok")]


def test_readers_see_only_committed_runs_and_time_travel(ray_local, tmp_path):
    out = str(tmp_path / "ds")
    one = JobRun(out, "invert")
    one.commit({LAT: one.write_small(LAT, _latent_rows(["k1"], one.run_id))}, {"in": 1})
    two = JobRun(out, "invert")
    two.commit({LAT: two.write_small(LAT, _latent_rows(["k1", "k2"], two.run_id, status="read_error"))}, {"in": 2})
    killed = JobRun(out, "invert")
    killed.write_small(LAT, _latent_rows(["k9"], killed.run_id))  # never committed
    dt = delta.open_table(out, "latents")
    assert sorted(dt.to_pyarrow_table()["image_id"].to_pylist()) == ["k1", "k2"]
    v_one = [h["version"] for h in dt.history() if h.get("run_id") == one.run_id][0]
    old = delta.open_table(out, "latents", version=v_one).to_pyarrow_table()
    assert old["image_id"].to_pylist() == ["k1"] and old["status"].to_pylist() == ["ok"]
    assert pa.compute.all(pa.compute.equal(dt.to_pyarrow_table()["status"], "read_error")).as_py()


def test_write_batch_keeps_the_codes_of_a_sliced_block(tmp_path):
    """Ray Data hands the write stage slices of its blocks; pyarrow 26 filters a sliced nested
    fixed-size list wrongly (other rows' values, or garbage). The codes written must be the
    slice's own, failure rows (null codes) split into their own file included."""
    import pyarrow.parquet as pq

    from pipeline.runner import write_batch
    from pipeline.schemas import nested_list_to_numpy, unsliced

    n = 12
    rng = np.random.default_rng(3)
    w = rng.normal(size=(n, 4, 8)).astype(np.float32)
    ok = np.array([i % 3 != 1 for i in range(n)])
    schema = latents_schema(4, 8)
    cols = {"image_id": [f"{i:064x}" for i in range(n)], "face_index": np.zeros(n, np.int32),
            "source_uri": [None] * n, "aligned_uri": [None] * n,
            "status": np.where(ok, "ok", "read_error").astype(object), "error": [None] * n}
    t = make_table(cols, schema, "run", w_plus=w, ok=ok)
    part = t.slice(5, 6)
    assert unsliced(part).filter(pa.array([True] * 6))["w_plus"].to_pylist() == part["w_plus"].to_pylist()
    recs = write_batch(part, str(tmp_path), "latents", "run", schema).to_pylist()
    back = pa.concat_tables([pq.read_table(tmp_path / "latents" / r["path"]) for r in recs if r["path"]])
    got = {i: row for i, row in zip(back["image_id"].to_pylist(), nested_list_to_numpy(back["w_plus"]))}
    for i in range(5, 11):
        if ok[i]:
            np.testing.assert_array_equal(got[f"{i:064x}"], w[i])
    assert len(got) == 6
