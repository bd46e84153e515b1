"""The inversion job end to end (local Ray, tiny seeded model saved in the official layout)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs import invert
from jobs.cli import load_config
from pipeline import delta
from pipeline.runner import JobRun, TableSpec
from pipeline.schemas import FACES_SCHEMA, faces_table, nested_list_to_numpy
from stmodel.checkpoint import load_inversion
from tests.conftest import write_crops


def _cfg(inp, out, ckpt, **over):
    sets = [f"input={inp}", f"output={out}", f"model.checkpoint={ckpt}", "invert.batch_size=4",
            "invert.load_batch_size=4", "progress=false"]
    sets += [f"{k}={v}" for k, v in over.items()]
    return load_config(invert.SETTINGS, None, sets)


def _table(out):
    return delta.read_snapshot_arrow(out, "latents")


def _keys(t):
    return list(zip(t["image_id"].to_pylist(), t["face_index"].to_pylist()))


def test_end_to_end_local_with_metrics_and_bad_crop(ray_local, tmp_path, tiny_checkpoint):
    ckpt, digest = tiny_checkpoint
    crops = tmp_path / "crops"
    files = write_crops(crops, 6)
    (crops / "broken.png").write_bytes(b"this is not a png")
    out = str(tmp_path / "ds")
    res = invert.run(_cfg(str(crops), out, ckpt, **{"metrics": "true",
                                                      "metric_weights.allow_random_init": "true"}))
    assert res["counts"] == {"in": 7, "ok": 6, "failed": 1, "skipped": 0}
    t = _table(out)
    assert t.num_rows == 7
    bad = t.filter(pa.compute.equal(t["status"], "decode_error")).to_pylist()
    assert len(bad) == 1 and bad[0]["w_plus"] is None and "not a recognised image" in bad[0]["error"]
    ok = t.filter(pa.compute.equal(t["status"], "ok"))
    assert set(ok["checkpoint_sha256"].to_pylist()) == {digest}
    # the stored codes are the model's own inversion of the same crops
    model, _ = load_inversion(ckpt)
    from PIL import Image

    from pipeline.images import to_model_input

    by_src = {r["source_uri"]: r for r in ok.to_pylist()}
    x = torch.from_numpy(np.stack([to_model_input(np.asarray(Image.open(f).convert("RGB")), 64) for f in files]))
    with torch.no_grad():
        expect = model.invert(x).numpy()
    got = np.stack([np.asarray(by_src[f]["w_plus"], dtype=np.float32) for f in files])
    assert got.shape == (6, 8, 64)
    assert np.allclose(got, expect, atol=1e-5)
    # metrics: the PSNR / MSE of the model's own reconstruction against the crop, the stored
    # reconstruction is that image, backbones labelled random-init
    from pipeline.scoring import to_uint8
    from stmodel.metrics import mse, psnr

    with torch.no_grad():
        y = model.reconstruct(model.invert(x))
    target = torch.from_numpy(np.stack([to_model_input(np.asarray(Image.open(f).convert("RGB")), y.shape[-1])
                                        for f in files]))
    want_psnr, want_mse = psnr(y, target).numpy(), mse(y, target).numpy()
    rows = [by_src[f] for f in files]
    assert np.allclose([r["psnr"] for r in rows], want_psnr, atol=1e-3)
    assert np.allclose([r["mse"] for r in rows], want_mse, rtol=1e-4)
    for r, img in zip(rows, to_uint8(y)):
        assert "RANDOM-INIT" in r["metric_backbones"]
        assert np.array_equal(np.asarray(Image.open(r["reconstruction_uri"]).convert("RGB")), img)
    m = res["extra"]["metrics"]
    assert m["psnr"]["n"] == 6 and abs(m["psnr"]["p50"] - float(np.median(want_psnr))) < 1e-3
    assert any("RANDOM-INIT" in b for b in m["backbones"])


def test_latents_readable_without_this_project(ray_local, tmp_path, tiny_checkpoint):
    """deltalake, pyarrow, pandas, polars and DuckDB read the committed table in a process that
    never imports this project; w_plus is list<list<float>> (Delta has no fixed-size list)."""
    ckpt, _ = tiny_checkpoint
    write_crops(tmp_path / "c", 3)
    out = str(tmp_path / "ds")
    invert.run(_cfg(str(tmp_path / "c"), out, ckpt))
    script = """
import json, sys
import numpy as np, duckdb, polars as pl
from deltalake import DeltaTable
dt = DeltaTable(sys.argv[1] + "/latents")
t = dt.to_pyarrow_table()
w = np.array(t["w_plus"].to_pylist(), dtype=np.float32)
df = dt.to_pandas()
d = dt.to_pyarrow_dataset()
con = duckdb.connect()
con.register("latents", d)
first = con.execute("SELECT w_plus[1][1], len(w_plus), len(w_plus[8]) FROM latents ORDER BY image_id").fetchall()[0]
pl_n = pl.read_delta(sys.argv[1] + "/latents").height
hist = [h.get("run_id") for h in dt.history()]
print(json.dumps({"type": str(t.schema.field("w_plus").type), "shape": list(w.shape), "pandas": len(df),
                  "duck": list(first), "polars": pl_n, "runs": hist, "version": dt.version(),
                  "w00": float(w[np.argsort(t["image_id"].to_pylist())[0], 0, 0])}))
"""
    p = subprocess.run([sys.executable, "-c", script, out], capture_output=True, text=True, cwd=str(tmp_path),
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout)
    assert got["type"] == "list<element: list<element: float>>"
    assert got["shape"] == [3, 8, 64] and got["pandas"] == 3 and got["polars"] == 3
    assert got["duck"][1] == 8 and got["duck"][2] == 64 and abs(got["duck"][0] - got["w00"]) < 1e-6
    assert len(got["runs"]) == 2 and got["runs"][0]  # the create and the run's commit, newest first
    arr = nested_list_to_numpy(_table(out)["w_plus"])
    assert arr.shape == (3, 8, 64)


def test_incremental_and_nothing_written_twice(ray_local, tmp_path, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    crops = tmp_path / "crops"
    write_crops(crops, 4, seed=1)
    out = str(tmp_path / "ds")
    r1 = invert.run(_cfg(str(crops), out, ckpt))
    assert r1["counts"] == {"in": 4, "ok": 4, "failed": 0, "skipped": 0}
    write_crops(crops, 3, seed=2)
    r2 = invert.run(_cfg(str(crops), out, ckpt))
    assert r2["counts"] == {"in": 7, "ok": 3, "failed": 0, "skipped": 4}
    version = delta.open_table(out, "latents").version()
    r3 = invert.run(_cfg(str(crops), out, ckpt))
    assert r3["counts"] == {"in": 7, "ok": 0, "failed": 0, "skipped": 7}
    assert delta.open_table(out, "latents").version() == version  # nothing committed
    t = _table(out)
    keys = list(zip(t["image_id"].to_pylist(), t["face_index"].to_pylist()))
    assert len(keys) == len(set(keys)) == 7


def test_crash_before_publish_leaves_nothing_then_rerun_completes(ray_local, tmp_path, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    write_crops(tmp_path / "c", 3, seed=3)
    out = str(tmp_path / "ds")

    def die(run):
        raise KeyboardInterrupt("killed before publishing")

    with pytest.raises(KeyboardInterrupt):
        invert.run(_cfg(str(tmp_path / "c"), out, ckpt), before_commit=die)
    assert _table(out) is None  # data files were written, but nothing committed: invisible
    orphans = [p for p in os.listdir(os.path.join(out, "latents")) if p.endswith(".parquet")]
    assert orphans and not os.path.exists(os.path.join(out, "_runs"))
    r = invert.run(_cfg(str(tmp_path / "c"), out, ckpt))
    assert r["counts"]["ok"] == 3
    t = _table(out)
    assert t.num_rows == 3 and set(t["run_id"].to_pylist()) == {r["run_id"]}
    assert all(o in os.listdir(os.path.join(out, "latents")) for o in orphans)  # left for vacuum, unread


def test_reads_committed_align_output(ray_local, tmp_path, tiny_checkpoint):
    """Input = a dataset root written by jobs.align: only ok faces of committed runs are inverted."""
    ckpt, _ = tiny_checkpoint
    root = str(tmp_path / "ds")
    files = write_crops(tmp_path / "aligned_src", 3, seed=5)
    from pipeline.decode import image_id

    rows = []
    for i, f in enumerate(files):
        iid = image_id(open(f, "rb").read())
        rows.append({"image_id": iid, "source_uri": f"s3://raw/photo{i}.jpg", "status": "ok", "n_faces": 1,
                     "face_index": 0, "aligned_uri": f})
    rows.append({"image_id": "f" * 64, "source_uri": "s3://raw/none.jpg", "status": "no_face",
                 "error": "no face", "n_faces": 0})
    spec = TableSpec("faces", FACES_SCHEMA, ("image_id", "face_index"), ("image_id",))
    run = JobRun(root, "align")
    run.commit({spec: run.write_small(spec, faces_table(rows, run.run_id))}, {"in": 4})
    crashed = JobRun(root, "align")  # an uncommitted align run: ignored
    crashed.write_small(spec, faces_table([{**rows[0], "image_id": "e" * 64}], crashed.run_id))
    r = invert.run(_cfg(root, root, ckpt))
    assert r["counts"] == {"in": 3, "ok": 3, "failed": 0, "skipped": 0}
    t = _table(root)
    assert sorted(t["source_uri"].to_pylist()) == [f"s3://raw/photo{i}.jpg" for i in range(3)]


def test_end_to_end_on_s3(ray_local, s3_bucket, tmp_path, tiny_checkpoint):
    import s3fs

    ckpt, digest = tiny_checkpoint
    fs = s3fs.S3FileSystem()
    files = write_crops(tmp_path / "c", 5, seed=6)
    for f in files:
        fs.put(f, f"{s3_bucket[5:]}/crops/{os.path.basename(f)}")
    fs.put(ckpt, f"{s3_bucket[5:]}/models/tiny.pt")
    out = f"{s3_bucket}/dataset"
    r = invert.run(_cfg(f"{s3_bucket}/crops", out, f"{s3_bucket}/models/tiny.pt",
                        **{"model.sha256": digest, "metrics": "true",
                           "metric_weights.allow_random_init": "true"}))
    assert r["counts"] == {"in": 5, "ok": 5, "failed": 0, "skipped": 0}
    t = _table(out)
    assert t.num_rows == 5
    assert all(u.startswith(f"{s3_bucket}/dataset/reconstructions/") for u in t["reconstruction_uri"].to_pylist())
    assert fs.exists(t["reconstruction_uri"][0].as_py())
    assert len(fs.ls(f"{s3_bucket[5:]}/dataset/_runs")) == 1
    r2 = invert.run(_cfg(f"{s3_bucket}/crops", out, f"{s3_bucket}/models/tiny.pt"))
    assert r2["counts"]["skipped"] == 5


def test_cli_help_and_summary_line(tmp_path, tiny_checkpoint):
    h = subprocess.run([sys.executable, "-m", "jobs.invert", "--help"], capture_output=True, text=True, check=True)
    assert "model.checkpoint" in h.stdout or "checkpoint:" in h.stdout
    assert "--set" in h.stdout
    ckpt, _ = tiny_checkpoint
    write_crops(tmp_path / "c", 2, seed=7)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "jobs.invert", "--quiet", "--set", f"input={tmp_path / 'c'}",
                        "--set", f"output={tmp_path / 'ds'}", "--set", f"model.checkpoint={ckpt}",
                        "--set", "ray.num_cpus=2"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["job"] == "invert" and summary["in"] == 2 and summary["ok"] == 2
    assert summary["in"] == summary["ok"] + summary["failed"] + summary["skipped"]
    assert summary["seconds"] > 0 and summary["run_id"]


def test_cli_refuses_a_pool_that_holds_every_cpu(tmp_path, tiny_checkpoint):
    """One CPU, one actor of one CPU: the reads that feed the actor could never run (the run
    would hang, ray-project/ray#44687); the job stops before any work with what to change."""
    ckpt, _ = tiny_checkpoint
    write_crops(tmp_path / "c", 2, seed=7)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "jobs.invert", "--quiet", "--set", f"input={tmp_path / 'c'}",
                        "--set", f"output={tmp_path / 'ds'}", "--set", f"model.checkpoint={ckpt}",
                        "--set", "ray.num_cpus=1"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 3, (p.stdout[-2000:], p.stderr[-3000:])
    assert "invert.num_cpus=1 would hold 1 of the cluster's 1 CPU(s)" in p.stderr
    assert "Lower invert.num_cpus or invert.concurrency" in p.stderr
    assert not (tmp_path / "ds" / "latents" / "_delta_log").exists() and not (tmp_path / "ds" / "_runs").exists()


def test_gpu_path_on_cpu_autocast_and_several_actors(ray_local, tmp_path, tiny_checkpoint):
    """The CUDA code path minus the device: autocast (bf16 on the CPU) and a pool of two
    actors; codes stay close to the fp32 ones and every face is written once."""
    ckpt, _ = tiny_checkpoint
    write_crops(tmp_path / "c", 10, seed=9)
    ref = invert.run(_cfg(str(tmp_path / "c"), str(tmp_path / "fp32"), ckpt))
    assert ref["counts"]["ok"] == 10
    r = invert.run(_cfg(str(tmp_path / "c"), str(tmp_path / "bf16"), ckpt, **{
        "invert.amp": "bf16", "invert.concurrency": 2, "invert.num_cpus": 0.5, "invert.batch_size": 2}))
    assert r["counts"] == {"in": 10, "ok": 10, "failed": 0, "skipped": 0}
    a = {x["image_id"]: np.asarray(x["w_plus"]) for x in _table(str(tmp_path / "fp32")).to_pylist()}
    b = {x["image_id"]: np.asarray(x["w_plus"]) for x in _table(str(tmp_path / "bf16")).to_pylist()}
    assert a.keys() == b.keys()
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    scale = max(float(np.abs(a[k]).max()) for k in a)
    print(f"bf16 autocast vs fp32: max |dW+| = {diff:.4f} (max |W+| = {scale:.2f})")
    assert 0 < diff < 0.05 * scale


def test_an_actor_runs_its_model_on_the_thread_that_built_it(tmp_path, tiny_checkpoint, monkeypatch):
    """Ray Data calls an actor's `__call__` on a thread of its own, not the one that ran
    `__init__`; the model must still be built and run on one thread (one OpenMP team)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pipeline import models
    from pipeline.invert_stage import InvertBatch

    ckpt, _ = tiny_checkpoint
    seen = {}
    real_load = models.load_model

    def recording_load(*args, **kwargs):
        seen["load"] = threading.get_ident()
        return real_load(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", recording_load)
    cfg = _cfg("unused", str(tmp_path), ckpt, **{"invert.amp": "none"})
    actor = InvertBatch(cfg.model, cfg.invert, "run-1", str(tmp_path))
    real_invert = actor.model.invert

    def recording_invert(x):
        seen["invert"] = threading.get_ident()
        return real_invert(x)

    actor.model.invert = recording_invert
    s = actor.model.cfg.input_size
    batch = {"image_id": np.array(["a", "b"], dtype=object), "face_index": np.array([0, 0]),
             "source_uri": np.array(["s/a", "s/b"], dtype=object),
             "aligned_uri": np.array(["x/a", "x/b"], dtype=object),
             "status": np.array(["ok", "ok"], dtype=object), "error": np.array([None, None], dtype=object),
             "image": np.random.default_rng(0).standard_normal((2, 3, s, s)).astype(np.float32)}
    with ThreadPoolExecutor(max_workers=1) as ray_udf_thread:
        out = ray_udf_thread.submit(actor, batch).result()
    assert out["status"].to_pylist() == ["ok", "ok"]
    assert seen["invert"] == seen["load"] != threading.get_ident()


def test_invert_settings_rules_and_preflight(tmp_path):
    """paste_back needs metrics=true (a settings rule); its photos' faces table is checked before
    Ray starts (check), as the formats and ranges of the invert section are when parsed."""
    from pipeline.config import SettingsError, parse

    with pytest.raises(SettingsError, match="paste_back: .*set metrics=true"):
        parse(invert.SETTINGS, {"paste_back": True})
    with pytest.raises(SettingsError) as e:
        parse(invert.SETTINGS, {"invert": {"max_bytes": -1, "torch_threads": -1, "load_batch_size": 0}})
    assert sorted(m.split(":")[0] for m in e.value.errors) == ["invert.load_batch_size", "invert.max_bytes",
                                                               "invert.torch_threads"]
    with pytest.raises(SettingsError, match=r"invert.formats: Pillow cannot open \['NOPE'\]"):
        parse(invert.SETTINGS, {"invert": {"formats": ["NOPE"]}})
    write_crops(tmp_path / "c", 1)
    cfg = {"input": str(tmp_path / "c"), "output": str(tmp_path / "o"), "model": {"preset": "tiny-32"}}
    assert invert.check(parse(invert.SETTINGS, cfg)) == []
    errors = invert.check(parse(invert.SETTINGS, {**cfg, "metrics": True, "paste_back": {"format": "png"}}))
    assert len(errors) == 1 and errors[0].startswith("paste_back: ") and "no committed faces table" in errors[0]
